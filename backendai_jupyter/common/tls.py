"""TLS on the client side of the gateway: whom to trust, and errors that say how to fix trust.

Agents, the provisioner, the launcher and the CLI all verify the gateway's certificate: against
the CA file they are given (the cluster's private CA from ``backendai-jupyter certs create``),
or else against the system trust store. Verification is never turned off.
"""

from __future__ import annotations

import os
import ssl

from .errors import ApiError

ENV_CA_FILE = "BACKENDAI_CA_FILE"
MIN_VERSION = ssl.TLSVersion.TLSv1_2


class TLSError(ApiError):
    """The gateway's certificate cannot be verified, or the CA file is unusable."""

    status = 502
    type = "tls-error"


def client_context(ca_file: str, where: str) -> ssl.SSLContext:
    """A verifying client context trusting ``ca_file`` (the system store when empty).

    ``where`` names the setting that holds the CA file, for the error message.
    """
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    except FileNotFoundError:
        raise TLSError(f"the CA file {ca_file} does not exist; fix {where}") from None
    except (ssl.SSLError, OSError) as e:
        raise TLSError(
            f"the CA file {ca_file} holds no usable PEM certificate ({e}); set {where} to the "
            "cluster's ca.pem"
        ) from None
    ctx.minimum_version = MIN_VERSION
    return ctx


def untrusted(url: str, ca_file: str, where: str, err: ssl.SSLCertVerificationError) -> TLSError:
    """The error for a gateway certificate that failed verification, with the fix."""
    reason = err.verify_message or str(err)
    trusted = f"the CA in {ca_file}" if ca_file else "the system trust store"
    if "mismatch" in reason.lower():
        fix = (
            "the certificate does not name this address: reach the gateway by a name the certificate "
            "holds, or re-create it with `backendai-jupyter certs create --host NAME --force`"
        )
    else:
        fix = (
            f"set {where} to the CA that signed the gateway's certificate (the ca.pem written by "
            "`backendai-jupyter certs create`)"
        )
    return TLSError(
        f"the gateway at {url} presented a certificate that {trusted} does not trust ({reason}): {fix}"
    )


def ca_file_from_env() -> str:
    """The CA file named by ``$BACKENDAI_CA_FILE``, or ``""``."""
    return os.environ.get(ENV_CA_FILE, "")
