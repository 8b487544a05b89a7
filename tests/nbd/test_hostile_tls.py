"""Hostile clients and TLS.

Misbehaving clients get the right NBD error or are dropped, and never harm the others; TLS works
with QEMU's and libnbd's clients using a self-signed CA made here.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import resource
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from vdisk.backends.memory import MemoryDevice
from vdisk.nbd import Export, NbdServer
from vdisk.nbd import protocol as p
from vdisk.nbd.client import NbdClient
from vdisk.nbd.server import tls_context_from_dir

from .conftest import need, run, unix_uri

MiB = 1 << 20


def served(serve_inproc: Callable[..., NbdServer], size: int = 8 * MiB) -> MemoryDevice:
    dev = MemoryDevice(size)
    dev.write(b"\x42" * MiB, 0)
    serve_inproc(Export(dev, discard="unmap"))
    return dev


def healthy(sock_path: str) -> None:
    with NbdClient(sock_path) as c:
        buf = bytearray(4096)
        c.readinto(buf, 0)
        assert buf == b"\x42" * 4096


def raw_negotiate(sock_path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.settimeout(10)
    assert len(s.recv(18, socket.MSG_WAITALL)) == 18
    s.sendall(p.U32.pack(p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES))
    s.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_EXPORT_NAME, 0))
    assert len(s.recv(10, socket.MSG_WAITALL)) == 10
    return s


def simple_reply(s: socket.socket) -> tuple[int, int]:
    magic, error, cookie = p.SIMPLE_REPLY.unpack(s.recv(16, socket.MSG_WAITALL))
    assert magic == p.NBD_SIMPLE_REPLY_MAGIC
    return error, cookie


def test_garbage_handshake_is_dropped(serve_inproc: Callable[..., NbdServer],
                                      sock_path: str) -> None:
    served(serve_inproc)
    for garbage in (os.urandom(4096), b"\xff\xff\xff\xff" + os.urandom(100),
                    p.U32.pack(3) + b"NOTMAGIC" + bytes(8)):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock_path)
        s.settimeout(10)
        s.recv(18, socket.MSG_WAITALL)
        s.sendall(garbage)
        # The server hangs up (possibly after error replies); it never hangs.
        while s.recv(65536):
            pass
        s.close()
    healthy(sock_path)


def test_huge_and_past_end_requests_keep_connection_sane(
        serve_inproc: Callable[..., NbdServer], sock_path: str) -> None:
    served(serve_inproc)
    s = raw_negotiate(sock_path)
    size = 8 * MiB
    cases = [
        (p.NBD_CMD_READ, 0, 0xFFFFFFFF, p.NBD_EINVAL),
        (p.NBD_CMD_READ, size - 512, 1024, p.NBD_EINVAL),
        (p.NBD_CMD_READ, 2**64 - 512, 1024, p.NBD_EINVAL),
        (p.NBD_CMD_TRIM, size, 1, p.NBD_ENOSPC),
        (p.NBD_CMD_WRITE_ZEROES, 0, 0xFFFFFFFF, p.NBD_ENOSPC),
        (p.NBD_CMD_CACHE, size, 4096, p.NBD_EINVAL),
        (77, 0, 0, p.NBD_EINVAL),
    ]
    for cookie, (rtype, offset, length, want) in enumerate(cases):
        s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, rtype, cookie, offset, length))
        assert simple_reply(s) == (want, cookie)
    # An oversized write: refused, its payload consumed, the stream still in step.
    n = p.MAX_PAYLOAD + 4096
    s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, 100, 0, n))
    s.sendall(bytes(n))
    # Write past the end: ENOSPC after the payload.
    s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, 101, size - 2, 4) + b"abcd")
    assert simple_reply(s) == (p.NBD_EINVAL, 100)
    assert simple_reply(s) == (p.NBD_ENOSPC, 101)
    s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_READ, 102, 0, 8))
    assert simple_reply(s) == (0, 102)
    assert s.recv(8, socket.MSG_WAITALL) == b"\x42" * 8
    s.close()
    healthy(sock_path)


def test_half_closed_client_gets_its_replies(serve_inproc: Callable[..., NbdServer],
                                             sock_path: str) -> None:
    served(serve_inproc)
    s = raw_negotiate(sock_path)
    for cookie in range(3):
        s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_READ, cookie, 4096 * cookie,
                                 4096))
    s.shutdown(socket.SHUT_WR)
    for cookie in range(3):
        assert simple_reply(s) == (0, cookie)
        assert s.recv(4096, socket.MSG_WAITALL) == b"\x42" * 4096
    assert s.recv(1) == b""  # then the server closes
    s.close()
    # Half a header, then half-close: the server drops it quietly.
    s = raw_negotiate(sock_path)
    s.sendall(p.REQUEST.pack(p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_READ, 1, 0, 4096)[:11])
    s.shutdown(socket.SHUT_WR)
    assert s.recv(1) == b""
    s.close()
    healthy(sock_path)


def test_bad_client_does_not_disturb_others(serve_inproc: Callable[..., NbdServer],
                                            sock_path: str) -> None:
    served(serve_inproc)
    with NbdClient(sock_path) as good:
        bad = raw_negotiate(sock_path)
        bad.sendall(b"\x00" * 28)  # bad request magic: hard disconnect
        assert bad.recv(1) == b""
        bad.close()
        buf = bytearray(MiB)
        good.readinto(buf, 0)
        assert buf == b"\x42" * MiB


def test_thousand_idle_connections(serve_inproc: Callable[..., NbdServer],
                                   sock_path: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2200 + 100
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    served(serve_inproc)
    idle = []
    try:
        for i in range(1000):
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock_path)
            if i % 2:  # half of them stop mid-negotiation
                s.sendall(p.U32.pack(p.NBD_FLAG_C_FIXED_NEWSTYLE))
            idle.append(s)
        healthy(sock_path)
        need("qemu-io")
        out = run("qemu-io", "-f", "raw", "-c", "read -P 0x42 0 64k", unix_uri(sock_path))
        assert "read 65536/65536" in out.stdout
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    healthy(sock_path)


# --- TLS ------------------------------------------------------------------------------------


def make_certs(d: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vdisk test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (d / "ca-cert.pem").write_bytes(ca.public_bytes(pem))
    (d / "server-cert.pem").write_bytes(cert.public_bytes(pem))
    (d / "server-key.pem").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))


def test_tls_with_qemu_and_libnbd(tmp_path: Path, serve_inproc: Callable[..., NbdServer]) -> None:
    need("qemu-io")
    need("nbdinfo")
    certs = tmp_path / "pki"
    certs.mkdir()
    make_certs(certs)
    dev = MemoryDevice(8 * MiB)
    server = serve_inproc(Export(dev), tcp=True, tls_context=tls_context_from_dir(str(certs)))
    host, port = server.tcp_address  # type: ignore[attr-defined]
    run("qemu-io", "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}",
        "--image-opts", f"driver=nbd,server.type=inet,server.host={host},server.port={port},"
        "tls-creds=tls0", "-c", "write -P 0x3c 1M 1M", "-c", "read -P 0x3c 1M 1M")
    buf = bytearray(MiB)
    dev.readinto(buf, MiB)
    assert buf == b"\x3c" * MiB
    info = json.loads(run("nbdinfo", "--json",
                          f"nbds://127.0.0.1:{port}/?tls-certificates={certs}").stdout)
    assert info["exports"][0]["export-size"] == 8 * MiB
    # Plaintext clients are refused (FORCEDTLS).
    proc = run("nbdinfo", f"nbd://127.0.0.1:{port}/", check=False)
    assert proc.returncode != 0
    proc = run("qemu-io", "-f", "raw", "-c", "read 0 4k", f"nbd://127.0.0.1:{port}", check=False)
    assert proc.returncode != 0


def test_tls_creds_missing_files(tmp_path: Path) -> None:
    from vdisk.errors import VdiskError

    with pytest.raises(VdiskError, match=r"server-cert\.pem"):
        tls_context_from_dir(str(tmp_path))
