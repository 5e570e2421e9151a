//! The Redis side: one server (a small pool of multiplexed, self-reconnecting
//! connections) or a Redis Cluster (one cluster connection that routes each call by
//! its first key), and the plan synchronisation every (re)load performs.
//!
//! What must always hold: every call has a deadline (`--redis-timeout-ms`), so a
//! stalled Redis turns into an error the failure mode decides, never a hung request;
//! plans are applied to every primary before a config is used.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{Cmd, RedisResult, Value};
use tokio::sync::Mutex;

/// Where the limits live.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
    timeout: Duration,
}

enum Inner {
    Single {
        pool: Vec<ConnectionManager>,
        next: AtomicUsize,
    },
    Cluster {
        client: Box<redis::cluster::ClusterClient>,
        connection: Mutex<Option<(redis::cluster_async::ClusterConnection, std::time::Instant)>>,
    },
}

fn timeout_error() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "Redis did not answer in time",
    ))
}

impl Redis {
    /// A standalone server: `pool` multiplexed connections used round robin. They
    /// connect lazily and reconnect by themselves, so the service starts (and
    /// applies its failure mode) while Redis is down.
    pub fn single(url: &str, pool: usize, timeout: Duration) -> RedisResult<Redis> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let mut managers = Vec::new();
        for _ in 0..pool.max(1) {
            managers.push(ConnectionManager::new_lazy_with_config(
                client.clone(),
                config.clone(),
            )?);
        }
        Ok(Redis {
            inner: Arc::new(Inner::Single {
                pool: managers,
                next: AtomicUsize::new(0),
            }),
            timeout,
        })
    }

    /// A Redis Cluster reached through the seed URLs.
    pub fn cluster(seeds: &[String], timeout: Duration) -> RedisResult<Redis> {
        let client = redis::cluster::ClusterClientBuilder::new(seeds.to_vec())
            .connection_timeout(timeout.max(Duration::from_millis(200)))
            .response_timeout(timeout)
            .retries(2)
            .build()?;
        Ok(Redis {
            inner: Arc::new(Inner::Cluster {
                client: Box::new(client),
                connection: Mutex::new(None),
            }),
            timeout,
        })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(*self.inner, Inner::Cluster { .. })
    }

    async fn cluster_connection(&self) -> RedisResult<redis::cluster_async::ClusterConnection> {
        let Inner::Cluster { client, connection } = &*self.inner else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "not a cluster",
            )));
        };
        let mut guard = connection.lock().await;
        if let Some((c, _)) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(self.timeout * 10, client.get_async_connection())
            .await
            .map_err(|_| timeout_error())??;
        *guard = Some((c.clone(), std::time::Instant::now()));
        Ok(c)
    }

    /// After a failure in a cluster, starts over from the seeds (at most once a
    /// second): a fresh connection reads the slot map anew, so a promoted replica is
    /// found even when calls only ever timed out.
    async fn forget_cluster_connection(&self) {
        if let Inner::Cluster { connection, .. } = &*self.inner {
            let mut guard = connection.lock().await;
            if guard
                .as_ref()
                .is_some_and(|(_, since)| since.elapsed() > Duration::from_secs(1))
            {
                *guard = None;
            }
        }
    }

    /// Runs one command (routed by its first key in a cluster).
    pub async fn query(&self, cmd: &Cmd) -> RedisResult<Value> {
        let work = async {
            match &*self.inner {
                Inner::Single { pool, next } => {
                    let i = next.fetch_add(1, Ordering::Relaxed) % pool.len().max(1);
                    let Some(con) = pool.get(i) else {
                        return Err(redis::RedisError::from((
                            redis::ErrorKind::Client,
                            "empty pool",
                        )));
                    };
                    let mut con = con.clone();
                    cmd.query_async::<Value>(&mut con).await
                }
                Inner::Cluster { .. } => {
                    let mut con = self.cluster_connection().await?;
                    cmd.query_async::<Value>(&mut con).await
                }
            }
        };
        let result = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| timeout_error())
            .and_then(|r| r);
        if let Err(e) = &result {
            if self.is_cluster()
                && !matches!(
                    e.kind(),
                    redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
                )
            {
                self.forget_cluster_connection().await;
            }
        }
        result
    }

    /// Runs one command on every primary (plans are per node), failing if any fails.
    pub async fn query_all_primaries(&self, cmd: &Cmd) -> RedisResult<Value> {
        match &*self.inner {
            Inner::Single { .. } => self.query(cmd).await,
            Inner::Cluster { .. } => {
                let mut con = self.cluster_connection().await?;
                let routing = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::AllSucceeded),
                ));
                tokio::time::timeout(self.timeout * 10, con.route_command(cmd.clone(), routing))
                    .await
                    .map_err(|_| timeout_error())?
            }
        }
    }

    /// Applies the plans a config needs: each plan's fields are set (an upsert, so
    /// no call ever sees a missing plan) and fields it no longer has are removed.
    pub async fn sync_plans(
        &self,
        plans: &std::collections::BTreeMap<String, Vec<(String, String)>>,
    ) -> Result<usize, String> {
        for (plan, fields) in plans {
            let mut set = redis::cmd("RL.PLAN.SET");
            set.arg(plan);
            for (name, spec) in fields {
                set.arg(name).arg(spec);
            }
            self.query_all_primaries(&set)
                .await
                .map_err(|e| format!("RL.PLAN.SET {plan}: {e}"))?;
            let current = self
                .query(redis::cmd("RL.PLAN.GET").arg(plan))
                .await
                .map_err(|e| format!("RL.PLAN.GET {plan}: {e}"))?;
            let stale: Vec<String> = crate::reply::map_entries(&current)
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| !fields.iter().any(|(name, _)| name == k))
                .collect();
            if !stale.is_empty() {
                let mut del = redis::cmd("RL.PLAN.DEL");
                del.arg(plan);
                for field in &stale {
                    del.arg(field);
                }
                self.query_all_primaries(&del)
                    .await
                    .map_err(|e| format!("RL.PLAN.DEL {plan}: {e}"))?;
            }
        }
        Ok(plans.len())
    }
}

/// The cluster hash slot of a key (CRC16/XMODEM of its hash tag, mod 16384).
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = key.get(open + 1..)?;
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| rest.get(..close)).flatten()
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &b in tagged {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::slot;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"{}foo"), slot(b"{}foo"));
        assert_eq!(slot(b"123456789"), 0x31c3);
    }
}
