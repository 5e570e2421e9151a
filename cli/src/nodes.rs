//! The servers a command talks to: one server, every node of a cluster (found from a
//! seed node's `CLUSTER NODES`), or the node serving one key (following `MOVED`).

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Value};

/// One server.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub primary: bool,
    pub info: ConnectionInfo,
}

impl Node {
    pub fn connect(&self) -> Result<redis::Connection, String> {
        redis::Client::open(self.info.clone())
            .and_then(|c| c.get_connection_with_timeout(std::time::Duration::from_secs(5)))
            .map_err(|e| format!("{}: {e}", self.name))
    }

    /// The node at `host`:`port`, reached like this one (credentials, TLS). An empty
    /// host (a cluster node that announces none) means this node's host.
    fn at(&self, host: &str, port: u16) -> Node {
        let host = if host.is_empty() {
            match self.info.addr() {
                ConnectionAddr::Tcp(h, _) | ConnectionAddr::TcpTls { host: h, .. } => h.clone(),
                _ => "127.0.0.1".to_string(),
            }
        } else {
            host.to_string()
        };
        let addr = match self.info.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.clone(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.clone(), port),
        };
        Node {
            name: format!("{host}:{port}"),
            primary: true,
            info: self.info.clone().set_addr(addr),
        }
    }

    /// The node a `MOVED`/`ASK` error's `host:port` names.
    fn redirected(&self, addr: &str) -> Result<Node, String> {
        addr.rsplit_once(':')
            .and_then(|(host, port)| Some(self.at(host, port.parse().ok()?)))
            .ok_or_else(|| format!("{}: cannot follow a redirect to '{addr}'", self.name))
    }
}

/// How many `MOVED` redirects one command follows before giving up (a cluster whose
/// slots are being moved around settles well within it).
const MAX_REDIRECTS: usize = 5;

/// A connection for the commands about one key. Following redirects (`--cluster`), a
/// `MOVED` reply moves it to the node serving the key, where it stays (so later
/// commands, `INFO` included, ask that node too); `ASK` (a slot halfway through a
/// migration) is followed for the one command. Not following, a redirect is an error
/// that suggests `--cluster`.
pub struct KeyConnection {
    node: Node,
    con: redis::Connection,
    follow_redirects: bool,
}

impl KeyConnection {
    pub fn open(node: Node, follow_redirects: bool) -> Result<KeyConnection, String> {
        let con = node.connect()?;
        Ok(KeyConnection {
            node,
            con,
            follow_redirects,
        })
    }

    /// The node this connection talks to now.
    pub fn node(&self) -> &str {
        &self.node.name
    }

    /// The connection to that node, for commands without a key (`INFO`).
    pub fn connection(&mut self) -> &mut redis::Connection {
        &mut self.con
    }

    pub fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, String> {
        for _ in 0..MAX_REDIRECTS {
            let error = match cmd.query::<T>(&mut self.con) {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            let (code, target) = match (error.code(), error.redirect_node()) {
                (Some(code @ ("MOVED" | "ASK")), Some((addr, _))) => (code, addr.to_string()),
                _ => return Err(error.to_string()),
            };
            if !self.follow_redirects {
                return Err(format!(
                    "{}: {code} {}: the key is served by another cluster node (add --cluster to follow it)",
                    self.node.name,
                    error.detail().unwrap_or_default()
                ));
            }
            let node = self.node.redirected(&target)?;
            if code == "ASK" {
                let mut con = node.connect()?;
                redis::cmd("ASKING")
                    .query::<()>(&mut con)
                    .map_err(|e| format!("{}: ASKING: {e}", node.name))?;
                return cmd
                    .query(&mut con)
                    .map_err(|e| format!("{}: {e}", node.name));
            }
            self.con = node.connect()?;
            self.node = node;
        }
        Err(format!(
            "{}: still redirected after {MAX_REDIRECTS} MOVED replies",
            self.node.name
        ))
    }
}

fn addr_name(addr: &ConnectionAddr) -> String {
    match addr {
        ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port}"),
        ConnectionAddr::Unix(path) => path.display().to_string(),
        _ => "server".to_string(),
    }
}

/// The server at `url`.
pub fn single(url: &str) -> Result<Node, String> {
    let info = url
        .into_connection_info()
        .map_err(|e| format!("bad URL '{url}': {e}"))?;
    Ok(Node {
        name: addr_name(info.addr()),
        primary: true,
        info,
    })
}

/// Every node of the cluster `url` belongs to, primaries first.
pub fn cluster(url: &str) -> Result<Vec<Node>, String> {
    let seed = single(url)?;
    let mut con = seed.connect()?;
    let listing: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query(&mut con)
        .map_err(|e| {
            format!(
                "{}: CLUSTER NODES: {e} (is this a cluster node?)",
                seed.name
            )
        })?;
    let mut nodes = Vec::new();
    for line in listing.lines() {
        // <id> <ip:port@cport[,hostname]> <flags> <master> ...
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(addr), Some(flags)) = (fields.get(1), fields.get(2)) else {
            continue;
        };
        if flags.contains("fail") || flags.contains("handshake") || flags.contains("noaddr") {
            continue;
        }
        let hostport = addr.split(['@', ',']).next().unwrap_or("");
        let Some((host, port)) = hostport.rsplit_once(':') else {
            continue;
        };
        let Ok(port) = port.parse::<u16>() else {
            continue;
        };
        let mut node = seed.at(host, port);
        node.primary = flags.contains("master");
        nodes.push(node);
    }
    if nodes.is_empty() {
        return Err(format!(
            "{}: CLUSTER NODES listed no reachable node",
            seed.name
        ));
    }
    // The seed's view of roles may lag a failover: ask each node itself.
    for node in &mut nodes {
        if let Ok(mut con) = node.connect() {
            if let Ok(Value::Array(role)) = redis::cmd("ROLE").query::<Value>(&mut con) {
                node.primary = role.first().map(text).as_deref() == Some("master");
            }
        }
    }
    nodes.sort_by_key(|n| (!n.primary, n.name.clone()));
    Ok(nodes)
}

/// `INFO tollgate` as `field → value` (without the `tollgate_` prefix).
pub fn tollgate_info(
    con: &mut redis::Connection,
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let text: String = redis::cmd("INFO")
        .arg("tollgate")
        .query(con)
        .map_err(|e| e.to_string())?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("tollgate_"))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect())
}

/// A reply as text, for messages.
pub fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(n) => n.to_string(),
        Value::Nil => "(nil)".into(),
        Value::Okay => "OK".into(),
        other => format!("{other:?}"),
    }
}
