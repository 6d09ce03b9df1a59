"""Store adapters: one small module per object store, each speaking its SDK (see ``stores.base``)."""
