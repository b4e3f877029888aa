"""``dpgan-agent certs``: create the cluster CA, issue node certificates, show certificates.

    dpgan-agent certs init  --dir DIR [--days N] [--common-name CN] [--exist-ok | --force]
    dpgan-agent certs issue --node-id NAME --ca-dir DIR [--out DIR] [--days N] [--dns NAME ...]
                            [--ip ADDR ...] [--exist-ok | --force]
    dpgan-agent certs show  FILE...

Exit status: 0 on success, 2 on a usage or input error (one line ``dpgan-agent certs: error: ...`` on
stderr, never a traceback). Imports only the standard library and ``cryptography``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from agent.security.certs import (
    CA_CERT_FILE,
    CA_DAYS,
    CA_KEY_FILE,
    EXPIRY_WARNING_DAYS,
    NODE_DAYS,
    CertificateError,
    create_ca,
    expires_soon,
    format_time,
    issue_node_certificate,
    load_node_credentials,
    node_file_stem,
    validate_node_id,
    write_certificate,
    write_private_key,
)

PROG = "dpgan-agent certs"


class _UsageError(Exception):
    """A usage or input error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one ``dpgan-agent certs: error: ...`` line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see {self.prog} --help)")


def _positive_days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of days, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 day, not {value}")
    return value


def _parser() -> _Parser:
    parser = _Parser(prog=PROG, description="X.509 certificates for the cluster's mutual TLS.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{init,issue,show}")

    init = commands.add_parser(
        "init",
        help="create the cluster CA (DIR/ca.crt, DIR/ca.key)",
        description="Create the cluster CA: DIR/ca.crt (give it to every node) and DIR/ca.key "
        "(keep it secret).",
    )
    init.add_argument("--dir", required=True, type=Path, help="folder for ca.crt and ca.key (created 0700)")
    init.add_argument("--days", type=_positive_days, default=CA_DAYS, help=f"validity (default {CA_DAYS})")
    init.add_argument("--common-name", default="dpgan cluster CA", help="the CA's subject CN")
    _overwrite_flags(init, "keep an existing CA and succeed", "replace an existing CA")

    issue = commands.add_parser(
        "issue",
        help="issue a node certificate (OUT/NAME.crt, OUT/NAME.key)",
        description="Issue a certificate for one node, signed by the CA in --ca-dir.",
    )
    issue.add_argument("--node-id", required=True, help="the node id (the certificate's subject CN)")
    issue.add_argument("--ca-dir", required=True, type=Path, help="folder holding ca.crt and ca.key")
    issue.add_argument("--out", type=Path, default=None, help="folder to write to (default: --ca-dir)")
    issue.add_argument(
        "--days", type=_positive_days, default=NODE_DAYS, help=f"validity (default {NODE_DAYS})"
    )
    issue.add_argument(
        "--dns", nargs="+", action="extend", default=[], metavar="NAME", help="extra DNS subjectAltNames"
    )
    issue.add_argument(
        "--ip", nargs="+", action="extend", default=[], metavar="ADDR", help="IP address subjectAltNames"
    )
    _overwrite_flags(
        issue,
        "keep an existing certificate that is still valid, signed by this CA and for this node id "
        "(re-issue it otherwise)",
        "replace an existing certificate",
    )

    show = commands.add_parser(
        "show", help="describe certificate files", description="Describe certificates."
    )
    show.add_argument("files", nargs="+", type=Path, metavar="FILE")
    return parser


def _overwrite_flags(parser: argparse.ArgumentParser, exist_ok: str, force: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--exist-ok", action="store_true", help=exist_ok)
    group.add_argument("--force", action="store_true", help=force)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _make_folder(folder: Path) -> None:
    """Create ``folder`` (mode 0700) if it does not exist; refuse a path that is not a folder."""
    if folder.exists():
        if not folder.is_dir():
            raise _UsageError(f"{folder} exists and is not a folder")
        return
    folder.mkdir(parents=True, mode=0o700)
    os.chmod(folder, 0o700)  # mkdir's mode is subject to the umask


# ------------------------------------------------------------------------------------------------ init


def _init(args: argparse.Namespace) -> int:
    folder: Path = args.dir
    cert_path, key_path = folder / CA_CERT_FILE, folder / CA_KEY_FILE
    existing = [path for path in (cert_path, key_path) if path.exists()]
    if existing and args.exist_ok:
        _check_existing_ca(cert_path, key_path)
        print(f"kept the existing CA {cert_path} (valid until {_expiry(cert_path)})")
        return 0
    if existing and not args.force:
        raise _UsageError(
            f"a CA already exists ({', '.join(map(str, existing))}); --exist-ok keeps it, --force replaces "
            "it (every certificate issued from the old CA then stops working)"
        )
    if existing:
        _warn(
            f"replacing the CA in {folder}: every certificate issued from the old CA stops working; "
            "re-issue each node's with `dpgan-agent certs issue --force`"
        )
    _make_folder(folder)
    cert_pem, key_pem = create_ca(args.common_name, days=args.days)
    write_private_key(key_path, key_pem)
    write_certificate(cert_path, cert_pem)
    print(f"wrote {cert_path} (give it to every node)")
    print(f"wrote {key_path} (keep it secret: it signs node certificates)")
    print(f"CA {args.common_name!r} valid until {_expiry(cert_path)}")
    return 0


def _check_existing_ca(cert_path: Path, key_path: Path) -> None:
    """Refuse (exit 2) to keep a CA folder that cannot issue: a file missing, not a CA, key mismatch."""
    for path in (cert_path, key_path):
        if not path.exists():
            raise _UsageError(
                f"{path} is missing but {cert_path.parent} holds part of a CA; restore it or replace the CA "
                "with --force (every certificate issued from the old CA then stops working)"
            )
    # issue_node_certificate does every check a CA has to pass to sign (CA, key match, not expired).
    try:
        issue_node_certificate(cert_path.read_bytes(), key_path.read_bytes(), "check", days=1)
    except CertificateError as error:
        raise _UsageError(
            f"the existing CA in {cert_path.parent} cannot issue certificates ({error}); "
            "replace it with --force"
        ) from None


def _expiry(cert_path: Path) -> str:
    return format_time(x509.load_pem_x509_certificate(cert_path.read_bytes()).not_valid_after_utc)


# ----------------------------------------------------------------------------------------------- issue


def _issue(args: argparse.Namespace) -> int:
    node_id: str = args.node_id
    validate_node_id(node_id)
    ca_dir: Path = args.ca_dir
    ca_cert_path, ca_key_path = ca_dir / CA_CERT_FILE, ca_dir / CA_KEY_FILE
    for path in (ca_cert_path, ca_key_path):
        if not path.is_file():
            raise _UsageError(
                f"{path}: no such file; create the CA first with `dpgan-agent certs init --dir {ca_dir}`"
            )
    out: Path = args.out if args.out is not None else ca_dir
    stem = node_file_stem(node_id)
    cert_path, key_path = out / f"{stem}.crt", out / f"{stem}.key"
    ca_files = {ca_cert_path.resolve(), ca_key_path.resolve()}
    if cert_path.resolve() in ca_files or key_path.resolve() in ca_files:
        raise _UsageError(
            f"node id {node_id!r} would write over the CA files in {ca_dir}; give --out another folder"
        )

    existing = [path for path in (cert_path, key_path) if path.exists()]
    if existing and args.exist_ok:
        reason = _reason_to_reissue(cert_path, key_path, ca_cert_path, node_id, args)
        if reason is None:
            print(f"kept {cert_path} and {key_path} (valid until {_expiry(cert_path)})")
            return 0
        print(f"re-issuing {cert_path}: {reason}")
    elif existing and not args.force:
        raise _UsageError(
            f"{', '.join(map(str, existing))} already exist; --exist-ok keeps a valid certificate, "
            "--force replaces it"
        )

    cert_pem, key_pem = issue_node_certificate(
        ca_cert_path.read_bytes(),
        ca_key_path.read_bytes(),
        node_id,
        days=args.days,
        dns_names=args.dns,
        ip_addresses=args.ip,
    )
    _make_folder(out)
    write_private_key(key_path, key_pem)
    write_certificate(cert_path, cert_pem)
    print(f"wrote {cert_path}")
    print(f"wrote {key_path}")
    print(f"node {node_id!r} valid until {_expiry(cert_path)} (CA: {ca_cert_path})")
    return 0


def _reason_to_reissue(
    cert_path: Path, key_path: Path, ca_cert_path: Path, node_id: str, args: argparse.Namespace
) -> str | None:
    """Why an existing certificate must be re-issued under --exist-ok; None keeps it.

    Re-issued: anything `load_node_credentials` refuses (missing half, expired, another CA, key mismatch,
    ...), another node id, a requested DNS name / IP address it lacks, or an expiry closer than
    min(30 days, half of --days), so a restarting container renews a certificate before it lapses."""
    try:
        credentials = load_node_credentials(cert_path, key_path, ca_cert_path)
    except CertificateError as error:
        return str(error)
    if credentials.node_id != node_id:
        return f"it is for node {credentials.node_id!r}"
    cert = x509.load_pem_x509_certificate(credentials.certificate_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    have = {name.lower() for name in names.get_values_for_type(x509.DNSName)}
    have |= {str(address) for address in names.get_values_for_type(x509.IPAddress)}
    wanted = [name.strip().lower().rstrip(".") for name in args.dns] + [
        address.strip() for address in args.ip
    ]
    missing = [name for name in wanted if name not in have and not _same_address(name, have)]
    if missing:
        return f"it lacks the subjectAltName {', '.join(missing)}"
    renew_days = min(EXPIRY_WARNING_DAYS, args.days // 2)
    if expires_soon(credentials, days=renew_days):
        return f"it expires within {renew_days} days ({format_time(credentials.not_valid_after)})"
    return None


def _same_address(text: str, have: set[str]) -> bool:
    try:
        return str(ipaddress.ip_address(text)) in have
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------------ show


def _show(args: argparse.Namespace) -> int:
    failed = False
    now = datetime.now(UTC)
    for index, path in enumerate(args.files):
        if index:
            print()
        try:
            data = path.read_bytes()
        except OSError as error:
            print(f"{PROG}: error: {path}: cannot be read ({error.strerror or error})", file=sys.stderr)
            failed = True
            continue
        try:
            certificates = x509.load_pem_x509_certificates(data)
        except ValueError:
            print(f"{PROG}: error: {path}: holds no PEM certificate", file=sys.stderr)
            failed = True
            continue
        for number, cert in enumerate(certificates):
            title = str(path) if len(certificates) == 1 else f"{path} [{number + 1}/{len(certificates)}]"
            print(title)
            for label, value in _describe(cert, now):
                print(f"  {label + ':':<12} {value}")
    return 2 if failed else 0


def _describe(cert: x509.Certificate, now: datetime) -> list[tuple[str, str]]:
    common_names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [f"DNS:{name}" for name in alt.get_values_for_type(x509.DNSName)]
        sans += [f"IP:{address}" for address in alt.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        sans = []
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    state = (
        "not yet valid" if now < start else "EXPIRED" if now > end else f"valid, {(end - now).days} days left"
    )
    return [
        ("subject CN", str(common_names[0].value) if common_names else "(none)"),
        ("SANs", ", ".join(sans) or "(none)"),
        ("issuer", cert.issuer.rfc4514_string()),
        ("valid", f"{format_time(start)} .. {format_time(end)} ({state})"),
        ("CA", "yes" if is_ca else "no"),
        ("SHA-256", cert.fingerprint(hashes.SHA256()).hex(":").upper()),
    ]


# ------------------------------------------------------------------------------------------------ main


def certs_main(argv: Sequence[str]) -> int:
    """Run ``dpgan-agent certs`` with ``argv`` (the arguments after ``certs``); returns the exit status:
    0 on success, 2 on a usage or input error (reported as one line on stderr)."""
    try:
        args = _parser().parse_args(list(argv))
        return {"init": _init, "issue": _issue, "show": _show}[args.command](args)
    except SystemExit as stop:  # --help
        return stop.code if isinstance(stop.code, int) else 0
    except (_UsageError, CertificateError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print(f"{PROG}: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
