//! What the proxy serves itself, with `--demo-page`: the demo page at `/` and the JavaScript
//! client at `/pushfleet.js`, same origin as the WebSocket endpoint so a browser needs nothing
//! else. Both are compiled in: no directory to deploy, no path to traverse. Every other plain
//! GET is still refused as not an upgrade (see [`crate::reject`]).

/// A page: its body and the content type it is served with.
#[derive(Debug, PartialEq, Eq)]
pub struct Page {
    /// The path it answers, without query.
    pub path: &'static str,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The whole body.
    pub body: &'static str,
}

/// Every page, by path.
pub const PAGES: [Page; 2] = [
    Page {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../web/demo.html"),
    },
    Page {
        path: "/pushfleet.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../web/pushfleet.js"),
    },
];

/// The page a request target names (its query ignored), if any.
pub fn find(target: &str) -> Option<&'static Page> {
    let path = target.split(['?', '#']).next().unwrap_or(target);
    PAGES.iter().find(|p| p.path == path)
}

impl Page {
    /// The whole HTTP response. `no-cache`: a browser revalidates, so a new proxy's page and
    /// client never mix with an old cached one.
    pub fn response(&self) -> Vec<u8> {
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
            self.content_type,
            self.body.len()
        );
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_found_by_path_whatever_the_query() {
        assert_eq!(find("/").unwrap().path, "/");
        assert_eq!(find("/?matches=5").unwrap().path, "/");
        assert_eq!(find("/pushfleet.js?v=1").unwrap().path, "/pushfleet.js");
        assert_eq!(find("/ws"), None);
        assert_eq!(find("/../pushfleet.js"), None);
        assert_eq!(find("/index.html"), None);
    }

    #[test]
    fn a_response_carries_its_type_and_exact_length() {
        let page = find("/pushfleet.js").unwrap();
        let text = String::from_utf8(page.response()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head.contains("Content-Type: text/javascript; charset=utf-8"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(body.contains("export class PushfleetClient"));
        // The demo page loads the client from the path served here.
        assert!(find("/").unwrap().body.contains("/pushfleet.js"));
    }
}
