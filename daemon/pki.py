"""Certificates by role. Every invariantd certificate comes from the cluster CA and carries its role as a URI
subjectAltName (the SPIFFE way of naming a workload, without the SPIFFE runtime):

    urn:invariantd:role:peer          a daemon: may connect to another daemon's peer listener, serve one, and call
                                      the peer methods of another daemon's RPC (caps, prepareVmm, incomingVmm,
                                      vmmStatus)
    urn:invariantd:role:orchestrator  an orchestrator / operator: may call the orchestrator methods of a daemon's
                                      RPC; never accepted on a peer listener, never served as a peer

A certificate without either is refused everywhere (one line naming the certificate and the missing URI). The
role check is daemon/tls.py's (cert_roles); issuing is a CA's job: README "Certificates and roles" shows openssl.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

ROLE_URIS = {"peer": "urn:invariantd:role:peer", "orchestrator": "urn:invariantd:role:orchestrator"}


def make_pki(directory: str | os.PathLike, nodes=("node-a", "node-b", "operator"),
             orchestrators=("operator",), roleless=()) -> dict[str, str]:
    """A throwaway CA and one certificate per node (CN = node; SAN localhost, 127.0.0.1, ::1 and the role URI:
    orchestrator for the names in `orchestrators`, peer for the others; server + client auth), written as PEM
    files (key and chain in one file); names in `roleless` get no role URI (tests of the refusal). Returns
    {"ca": path, node: path}. ECDSA P-256, 1 day. For the demo, the tests and the lab; a fleet issues its
    certificates from its own CA (README: "Certificates and roles")."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "invariantd demo CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    files = {"ca": str(d / "ca.pem")}
    (d / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    for n in nodes:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1"))] + ([] if n in roleless else [
                    x509.UniformResourceIdentifier(ROLE_URIS["orchestrator" if n in orchestrators else "peer"])])),
                    critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        p = d / f"{n}.pem"
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            f.write(cert.public_bytes(pem))
        files[n] = str(p)
    return files
