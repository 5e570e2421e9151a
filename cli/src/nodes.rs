//! The servers a command talks to: one server, or every node of a cluster (found
//! from a seed node's `CLUSTER NODES`).

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
        let host = if host.is_empty() { "127.0.0.1" } else { host };
        let tcp = match seed.info.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.to_string(), port),
        };
        let info = seed.info.clone().set_addr(tcp);
        nodes.push(Node {
            name: format!("{host}:{port}"),
            primary: flags.contains("master"),
            info,
        });
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
