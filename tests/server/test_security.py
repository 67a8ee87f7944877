"""TLS, mutual TLS and bearer-token authentication, on a real loopback server."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rudder import client as rc
from rudder.server.app import BackgroundServer, Tls
from rudder.server.backends.reference import ReferenceEngine


def _cert(name: str, key, issuer_name, issuer_key, ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
         .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")

    def write(name, key, cert):
        (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rudder-test-ca")])
    write("ca", ca_key, _cert("rudder-test-ca", ca_key, ca_name, ca_key, ca=True))
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, key, _cert(name, key, ca_name, ca_key))
    other_key = ec.generate_private_key(ec.SECP256R1())  # a client the CA never signed
    write("stranger", other_key, _cert("stranger", other_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                            "stranger")]), other_key))
    return d


@pytest.fixture(scope="module")
def engine(tiny_dir, tiny_sae_dir):
    return ReferenceEngine(tiny_dir, saes=[f"s={tiny_sae_dir}"])


def test_tls_and_bearer_token(engine, pki):
    tls = Tls(str(pki / "server.pem"), str(pki / "server.key"))
    with BackgroundServer(engine, "tiny", tls=tls, token="s3cret") as srv:
        creds = rc.tls_credentials(str(pki / "ca.pem"))
        with rc.Client(srv.address, timeout=30, credentials=creds, token="s3cret") as c:
            assert len(list(c.generate("The capital", max_tokens=2))) == 2
        for token in (None, "wrong"):
            with rc.Client(srv.address, timeout=30, credentials=creds, token=token) as c:
                with pytest.raises(rc.Unauthenticated, match="bearer token"):
                    c.model_info()
                with pytest.raises(rc.Unauthenticated):
                    list(c.generate("The capital", max_tokens=2))
        # health stays open for probes, without a token
        with grpc.secure_channel(srv.address, creds) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        # plaintext to a TLS port fails
        with rc.Client(srv.address, timeout=5, token="s3cret") as c:
            with pytest.raises(rc.RudderError):
                c.model_info()


def test_mutual_tls_accepts_only_clients_the_ca_signed(engine, pki):
    tls = Tls(str(pki / "server.pem"), str(pki / "server.key"), client_ca=str(pki / "ca.pem"))
    with BackgroundServer(engine, "tiny", tls=tls) as srv:
        ok = rc.tls_credentials(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
        with rc.Client(srv.address, timeout=30, credentials=ok) as c:
            assert c.model_info().name == "tiny"
        for creds in (rc.tls_credentials(str(pki / "ca.pem")),
                      rc.tls_credentials(str(pki / "ca.pem"), str(pki / "stranger.pem"), str(pki / "stranger.key"))):
            with rc.Client(srv.address, timeout=5, credentials=creds) as c:
                with pytest.raises(rc.Unavailable):
                    c.model_info()


def test_the_openai_door_takes_the_same_mutual_tls_and_token(engine, pki):
    """`--openai-port` under `--tls-client-ca` and a token: the official client with a signed client
    certificate and the token gets a completion; without a certificate, with one the CA never signed,
    or without the token, it is refused."""
    import httpx
    import openai

    tls = Tls(str(pki / "server.pem"), str(pki / "server.key"), client_ca=str(pki / "ca.pem"))
    with BackgroundServer(engine, "tiny", tls=tls, token="s3cret", openai_port=0) as srv:
        url = f"https://127.0.0.1:{srv.server.openai.port}/v1"

        def door(cert: str | None, token: str = "s3cret") -> openai.OpenAI:
            import ssl

            ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
            if cert:
                ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
            return openai.OpenAI(base_url=url, api_key=token, max_retries=0, timeout=30,
                                 http_client=httpx.Client(verify=ctx))

        out = door("client").completions.create(model="tiny", prompt="The capital", max_tokens=2)
        assert out.usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            door("client", token="wrong").completions.create(model="tiny", prompt="The capital", max_tokens=2)
        for cert in (None, "stranger"):
            with pytest.raises(openai.APIConnectionError):
                door(cert).completions.create(model="tiny", prompt="The capital", max_tokens=2)
