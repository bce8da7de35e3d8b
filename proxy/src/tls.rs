//! TLS toward clients (optional: `--tls-cert` and `--tls-key`): rustls with the aws-lc-rs
//! provider, TLS 1.3 and 1.2, ALPN `http/1.1` (WebSocket upgrades are HTTP/1.1). Workers are
//! reached in plain TCP; they learn the client used TLS from `X-Forwarded-Proto: https`.
//!
//! A client on a TLS listener gets no HTTP answer before its handshake is done: an admission
//! refusal closes the connection at once, because a handshake per refused client is the very
//! work admission protects the proxy from.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{crypto, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Reads the PEM certificate chain (leaf first) and private key, and builds the acceptor.
/// The error names the file and what is wrong with it.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, (&'static str, String)> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ("--tls-cert", format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        let why = format!("{}: no PEM certificate in it", cert.display());
        return Err(("--tls-cert", why));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ("--tls-key", format!("{}: {e}", key.display())))?;
    let provider = Arc::new(crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("--tls-cert", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| ("--tls-key", format!("does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A client connection, in plain TCP or TLS.
pub enum ClientStream {
    /// Plain TCP (or TLS not yet accepted).
    Plain(TcpStream),
    /// TLS (boxed: the TLS state is large, and most deployments have none).
    Tls(Box<TlsStream<TcpStream>>),
}

impl ClientStream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ClientStream::Plain(s) => s,
            ClientStream::Tls(s) => s.get_ref().0,
        }
    }

    /// The scheme the client used, for `X-Forwarded-Proto`.
    pub fn proto(&self) -> &'static str {
        match self {
            ClientStream::Plain(_) => "http",
            ClientStream::Tls(_) => "https",
        }
    }

    /// Runs the TLS handshake on a plain stream (the caller bounds the time).
    pub async fn accept(self, acceptor: &TlsAcceptor) -> io::Result<ClientStream> {
        match self {
            ClientStream::Plain(s) => Ok(ClientStream::Tls(Box::new(acceptor.accept(s).await?))),
            tls => Ok(tls),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{server, Config};
    use std::path::PathBuf;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    use tokio_rustls::TlsConnector;
    use tokio_util::sync::CancellationToken;

    /// A self-signed certificate for `localhost` and 127.0.0.1 (P-256, valid until 2126),
    /// made for these tests only.
    const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBvjCCAWWgAwIBAgIUFGgo7cr8u3RFtVkMdMJg3EGxBvYwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyMzE1MDczN1oYDzIxMjYxMDMw
MTUwNzM3WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAR35PNTwn/ksndbEfF2GSOSwc69NGqvcP7Rtsk4bf0h4mm9ilMbtLcB
qcbJXOS7cb9uQ7JB98sM7w00AnehJBqAo4GSMIGPMB0GA1UdDgQWBBS0YaAHWxaw
vap/zQoGWmtHwM5fuzAfBgNVHSMEGDAWgBS0YaAHWxawvap/zQoGWmtHwM5fuzAa
BgNVHREEEzARgglsb2NhbGhvc3SHBH8AAAEwDAYDVR0TAQH/BAIwADAOBgNVHQ8B
Af8EBAMCB4AwEwYDVR0lBAwwCgYIKwYBBQUHAwEwCgYIKoZIzj0EAwIDRwAwRAIg
JbPtK51uUwt/bGR/wCsqLkVasiekVLLQU6AE2t/VioICIArledY9WdVtW0+e+cwi
lY+6TSe4QvVP81LTy0Iash4H
-----END CERTIFICATE-----
";
    /// Its private key.
    const KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgkTv+B4eByiSAeKMa
MuJOQJdiDD4da3tMb2ZLQPIABsahRANCAAR35PNTwn/ksndbEfF2GSOSwc69NGqv
cP7Rtsk4bf0h4mm9ilMbtLcBqcbJXOS7cb9uQ7JB98sM7w00AnehJBqA
-----END PRIVATE KEY-----
";
    const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    /// A file in the temporary directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn with(name: &str, text: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            let unique = format!("pushfleet-proxy-{}-{nanos}-{name}", std::process::id());
            let path = std::env::temp_dir().join(unique);
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn unusable_certificates_and_keys_are_named() {
        let (cert, key) = (TempFile::with("c.pem", CERT), TempFile::with("k.pem", KEY));
        assert!(acceptor(&cert.0, &key.0).is_ok());
        let missing = Path::new("/nonexistent/cert.pem");
        assert_eq!(acceptor(missing, &key.0).err().unwrap().0, "--tls-cert");
        let not_pem = TempFile::with("x.pem", "hello\n");
        let (flag, why) = acceptor(&not_pem.0, &key.0).err().unwrap();
        assert_eq!(flag, "--tls-cert");
        assert!(why.contains("no PEM certificate"), "{why}");
        assert_eq!(acceptor(&cert.0, &cert.0).err().unwrap().0, "--tls-key");
    }

    #[tokio::test]
    async fn a_tls_client_is_relayed_and_the_worker_told_https() {
        let (cert, key) = (TempFile::with("c.pem", CERT), TempFile::with("k.pem", KEY));
        // A stand-in worker: hands over the request head, answers 101, then echoes.
        let worker = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let worker_addr = worker.local_addr().unwrap();
        let (head_tx, head_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = worker.accept().await.unwrap();
            let mut buf = Vec::new();
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                assert!(s.read_buf(&mut buf).await.unwrap() > 0);
            }
            let _ = head_tx.send(String::from_utf8(buf).unwrap());
            s.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
                .await
                .unwrap();
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let mut config = Config::for_tests();
        config.workers = vec![worker_addr.to_string()];
        config.tls_cert = Some(cert.0.clone());
        config.tls_key = Some(key.0.clone());
        config.handshake_timeout = std::time::Duration::from_secs(5);
        let proxy = server::start(config, CancellationToken::new())
            .await
            .unwrap();

        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&cert.0).unwrap())
            .unwrap();
        let provider = Arc::new(crypto::aws_lc_rs::default_provider());
        let client_config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = TlsConnector::from(Arc::new(client_config));
        let tcp = TcpStream::connect(proxy.ws_addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(UPGRADE.as_bytes()).await.unwrap();
        let head = head_rx.await.unwrap();
        assert!(head.contains("\r\nX-Forwarded-Proto: https\r\n"), "{head}");
        assert!(
            head.contains("\r\nX-Forwarded-For: 127.0.0.1\r\n"),
            "{head}"
        );
        let answer = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        let mut got = vec![0u8; answer.len()];
        tls.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, answer);
        let frame = [0x81u8, 0x82, 1, 2, 3, 4, 0x69 ^ 1, 0x21 ^ 2];
        tls.write_all(&frame).await.unwrap();
        let mut echoed = [0u8; 8];
        tls.read_exact(&mut echoed).await.unwrap();
        assert_eq!(
            echoed, frame,
            "relayed byte for byte, decrypted and re-encrypted"
        );

        // Plain HTTP on the TLS port gets no HTTP answer, and is counted.
        let mut plain = TcpStream::connect(proxy.ws_addr).await.unwrap();
        plain.write_all(UPGRADE.as_bytes()).await.unwrap();
        let mut rest = Vec::new();
        let _ = plain.read_to_end(&mut rest).await;
        assert!(
            !rest.starts_with(b"HTTP/1.1"),
            "{:?}",
            String::from_utf8_lossy(&rest)
        );
        let metrics = proxy.shared.render_metrics();
        assert!(
            metrics.contains("proxy_refused_total{reason=\"tls_handshake\"} 1"),
            "{metrics}"
        );
    }
}
