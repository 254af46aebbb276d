"""TLS for the kernel's own HTTPS calls (the CPD volume API) and for the client tools that reach WMLA."""
from __future__ import annotations

import ssl


def tls_context(verify_tls: bool) -> ssl.SSLContext:
    """The default TLS context, or one that accepts a self-signed certificate (a WMLA or CPD route)."""
    context = ssl.create_default_context()
    if not verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
