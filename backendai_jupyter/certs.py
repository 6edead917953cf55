"""``backendai-jupyter certs create``: a private CA and the gateway's certificate, for one cluster.

The CA signs the gateway's certificate; agents and clients trust the CA (``ca.pem``), so the
gateway's certificate can be renewed without touching them. Keys are written readable by their
owner only. Existing files are never overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

FILES = ("ca.pem", "ca-key.pem", "gateway.pem", "gateway-key.pem")
ALWAYS = ("localhost", "127.0.0.1", "::1")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="backendai-jupyter certs", description=__doc__)
    sub = ap.add_subparsers(dest="verb", required=True)
    create = sub.add_parser("create", help="write ca.pem, ca-key.pem, gateway.pem and gateway-key.pem")
    create.add_argument("--dir", required=True, type=Path, help="where to write the files")
    create.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="a name or address clients and agents use for the gateway (repeat for several); "
        "localhost, 127.0.0.1 and ::1 are always included",
    )
    create.add_argument("--days", type=int, default=825, help="validity of the gateway's certificate")
    create.add_argument("--ca-days", type=int, default=3650, help="validity of the CA")
    create.add_argument("--force", action="store_true", help="overwrite existing files")
    return ap


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode, so a key is never readable by others, not even briefly.
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def create(directory: Path, hosts: list[str], days: int = 825, ca_days: int = 3650) -> dict[str, Path]:
    """Make a CA and a gateway certificate for ``hosts`` (plus localhost) in ``directory``."""
    now = datetime.now(UTC) - timedelta(minutes=5)  # tolerate a little clock skew between hosts
    names = list(dict.fromkeys([*hosts, *ALWAYS]))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "backendai-jupyter"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"backendai-jupyter CA {now:%Y-%m-%d}"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / name for name in FILES}
    _write(paths["ca-key.pem"], _key_pem(ca_key), 0o600)
    _write(paths["ca.pem"], ca.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths["gateway-key.pem"], _key_pem(key), 0o600)
    _write(paths["gateway.pem"], cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    directory = args.dir.resolve()
    existing = [name for name in FILES if (directory / name).exists()]
    if existing and not args.force:
        print(
            f"{directory} already holds {', '.join(existing)}: not overwriting (agents and clients "
            "trust the CA there). Use them as they are, or pass --force to make a new CA and "
            "certificate (then give every agent and client the new ca.pem).",
            file=sys.stderr,
        )
        return 1
    paths = create(directory, args.host, args.days, args.ca_days)
    hosts = ", ".join(dict.fromkeys([*args.host, *ALWAYS]))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(f"the gateway's certificate is valid for: {hosts}")
    print(f"keep {paths['ca-key.pem']} private (it signs certificates every agent and client trusts).")
    print()
    print("gateway:")
    print(f"  backendai-jupyter gateway --Gateway.certfile={paths['gateway.pem']} \\")
    print(f"      --Gateway.keyfile={paths['gateway-key.pem']} --ip=0.0.0.0")
    print("  (or BACKENDAI_GATEWAY_CERTFILE / BACKENDAI_GATEWAY_KEYFILE; `up` takes the same options)")
    print("agents (copy ca.pem to each host):")
    host = args.host[0] if args.host else "localhost"
    print(f"  backendai-jupyter agent --gateway-url=https://{host}:8470 --Agent.ca_file=ca.pem")
    print("  (or BACKENDAI_CA_FILE=ca.pem)")
    print("clients (provisioner, launcher, status, admin):")
    print('  "ca_file": "/path/to/ca.pem" in the client config, or BACKENDAI_CA_FILE=/path/to/ca.pem')
    return 0
