"""Store adapters: one small module per object store, each speaking its SDK (see ``stores.base``).

Importing any adapter puts ckptcloud's redacting filter on the SDKs' request loggers (see
:mod:`ckptcloud.redaction`), so turning on DEBUG logging does not print SAS signatures or access key ids.
"""

from ckptcloud.redaction import install_log_filters

install_log_filters()
