//! The server in-process on loopback, spoken to as raw HTTP/1.1 over one keep-alive connection.
use baton_test_upstream::pattern;
use baton_test_upstream::server::{Stats, serve};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn start() -> (std::net::SocketAddr, Arc<Stats>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(Stats::default());
    tokio::spawn(serve(listener, stats.clone()));
    (addr, stats)
}

/// Sends one request and reads one content-length-delimited response.
async fn request(conn: &mut BufReader<TcpStream>, head: &str, body: &[u8]) -> Resp {
    conn.get_mut().write_all(head.as_bytes()).await.unwrap();
    conn.get_mut().write_all(body).await.unwrap();
    let mut line = String::new();
    conn.read_line(&mut line).await.unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        conn.read_line(&mut line).await.unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').unwrap();
        headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    let len: usize = resp.header("content-length").unwrap().parse().unwrap();
    resp.body = vec![0; len];
    conn.read_exact(&mut resp.body).await.unwrap();
    resp
}

#[tokio::test]
async fn endpoints_over_keep_alive() {
    let (addr, stats) = start().await;
    let mut conn = BufReader::new(TcpStream::connect(addr).await.unwrap());

    let r = request(
        &mut conn,
        "GET /bytes/100000?seed=7 HTTP/1.1\r\nhost: t\r\n\r\n",
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("etag"), Some("\"100000-7\""));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.body, pattern(7, 0, 100_000));

    let r = request(
        &mut conn,
        "GET /bytes/100000?seed=7 HTTP/1.1\r\nhost: t\r\nrange: bytes=20000-20099\r\n\r\n",
        b"",
    )
    .await;
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 20000-20099/100000"));
    assert_eq!(r.body, pattern(7, 20_000, 100));

    // if-range with another etag: the whole body.
    let r = request(
        &mut conn,
        "GET /bytes/1000 HTTP/1.1\r\nhost: t\r\nrange: bytes=10-\r\nif-range: \"1000-1\"\r\n\r\n",
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, pattern(0, 0, 1000));
    // ... with its own etag: the range.
    let r = request(
        &mut conn,
        "GET /bytes/1000 HTTP/1.1\r\nhost: t\r\nrange: bytes=10-\r\nif-range: \"1000-0\"\r\n\r\n",
        b"",
    )
    .await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, pattern(0, 10, 990));

    let r = request(
        &mut conn,
        "GET /bytes/10 HTTP/1.1\r\nhost: t\r\nrange: bytes=10-\r\n\r\n",
        b"",
    )
    .await;
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */10"));

    let body = pattern(99, 0, 300_000);
    let r = request(
        &mut conn,
        concat!(
            "POST /echo HTTP/1.1\r\nhost: t\r\ncontent-type: application/x-test\r\n",
            "content-length: 300000\r\n\r\n"
        ),
        &body,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/x-test"));
    assert_eq!(r.body, body);

    let r = request(
        &mut conn,
        "GET /headers HTTP/1.1\r\nhost: t\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).unwrap();
    assert!(
        text.lines().any(|l| l == "x-forwarded-for: 10.0.0.1"),
        "{text}"
    );
    assert!(text.lines().any(|l| l == "host: t"), "{text}");

    let r = request(
        &mut conn,
        "GET /status/503 HTTP/1.1\r\nhost: t\r\n\r\n",
        b"",
    )
    .await;
    assert_eq!(r.status, 503);
    assert!(r.body.is_empty());

    let r = request(&mut conn, "GET /nope HTTP/1.1\r\nhost: t\r\n\r\n", b"").await;
    assert_eq!(r.status, 404);

    let start = std::time::Instant::now();
    let r = request(&mut conn, "GET /slow/200 HTTP/1.1\r\nhost: t\r\n\r\n", b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"ok");
    assert!(start.elapsed() >= std::time::Duration::from_millis(200));

    let start = std::time::Instant::now();
    let r = request(
        &mut conn,
        "GET /drip/5000?seed=3&chunk=1000&interval_ms=50 HTTP/1.1\r\nhost: t\r\n\r\n",
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, pattern(3, 0, 5000));
    // Five chunks, four intervals between them.
    assert!(start.elapsed() >= std::time::Duration::from_millis(200));

    let r = request(&mut conn, "GET /stats HTTP/1.1\r\nhost: t\r\n\r\n", b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        String::from_utf8(r.body).unwrap().trim(),
        "{\"requests\": 11, \"connections\": 1}"
    );
    assert_eq!(
        stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        11
    );
}
