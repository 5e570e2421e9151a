//! `tollgate-rls`: a drop-in Envoy rate limit service (`envoy.service.ratelimit.v3`)
//! backed by the Tollgate Redis module. `tollgate-rls --help` documents every flag.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use notify::Watcher;
use tollgate_rls::backend::Redis;
use tollgate_rls::config;
use tollgate_rls::metrics::{self, Metrics};
use tollgate_rls::proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tollgate_rls::service::{FailureMode, Grpc, Service, Settings};

/// A drop-in Envoy rate limit service (envoy.service.ratelimit.v3.RateLimitService)
/// backed by the Tollgate Redis module: envoyproxy/ratelimit's YAML config, every
/// descriptor of a request decided in one atomic step.
#[derive(Parser, Debug)]
#[command(name = "tollgate-rls", version, about, long_about = None)]
struct Args {
    /// Directory of rate limit config files (*.yaml, *.yml; envoyproxy/ratelimit's
    /// format, one domain per file). Reloaded when a file changes; a file that does not
    /// load is refused (naming the file and position) and the last good config stays.
    #[arg(long, env = "TOLLGATE_RLS_CONFIG_DIR", value_name = "DIR")]
    config_dir: PathBuf,

    /// Merge files that name the same domain instead of refusing them
    /// (envoyproxy/ratelimit's MERGE_DOMAIN_CONFIG).
    #[arg(long, env = "TOLLGATE_RLS_MERGE_DOMAINS")]
    merge_domains: bool,

    /// Also load config files whose names start with a dot.
    #[arg(long)]
    include_dot_files: bool,

    /// Load and check the config directory, print the plans it needs, and exit
    /// (0 when valid).
    #[arg(long)]
    check: bool,

    /// Address of the gRPC server (RateLimitService and grpc.health.v1.Health).
    #[arg(long, env = "TOLLGATE_RLS_GRPC_ADDR", default_value = "0.0.0.0:8081")]
    grpc_addr: SocketAddr,

    /// Address of the HTTP server: /metrics (Prometheus) and /healthcheck.
    #[arg(long, env = "TOLLGATE_RLS_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,

    /// Redis URL (redis://[user:password@]host:port[/db], rediss:// for TLS). With
    /// --cluster, a comma-separated list of seed nodes.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,

    /// Talk to a Redis Cluster (the URL lists seed nodes).
    #[arg(long, env = "TOLLGATE_RLS_CLUSTER")]
    cluster: bool,

    /// Multiplexed connections to a standalone Redis, used round robin (cluster mode
    /// keeps one multiplexed connection per node).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    redis_pool_size: u16,

    /// Deadline of one Redis call, in milliseconds; past it the failure mode answers.
    #[arg(long, default_value_t = 500)]
    redis_timeout_ms: u64,

    /// What to answer when Redis fails or does not answer in time: allow (OK, fail
    /// open), deny (OVER_LIMIT, fail closed) or error (gRPC UNAVAILABLE, so Envoy's
    /// failure_mode_deny decides — envoyproxy/ratelimit's behaviour).
    #[arg(long, env = "TOLLGATE_RLS_FAILURE_MODE", value_enum, default_value_t = FailureMode::Error)]
    failure_mode: FailureMode,

    /// Global shadow mode: decide and count as usual, but always answer OK
    /// (envoyproxy/ratelimit's SHADOW_MODE).
    #[arg(long, env = "SHADOW_MODE")]
    shadow_mode: bool,

    /// Response headers to add, comma-separated: x-ratelimit (x-ratelimit-limit,
    /// -remaining, -reset of the most constrained descriptor) and/or ietf
    /// (RateLimit-Policy for every limit and RateLimit for the most constrained).
    #[arg(long, value_delimiter = ',', value_name = "KIND")]
    response_headers: Vec<HeaderKind>,

    /// Add dynamic metadata to responses: the domain, the descriptors, the limit that
    /// denied (deniedBy) and the metadata of the rules that passed.
    #[arg(long, env = "RESPONSE_DYNAMIC_METADATA")]
    dynamic_metadata: bool,

    /// At most this many subject keys in one RL.ACQUIRE (the module's ALSO takes 8
    /// more keys by default); more descriptors are decided in separate steps.
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u16).range(1..=16))]
    max_keys_per_call: u16,

    /// How long a reservation made on the request path (a request id entry) waits for
    /// its settlement, unless the domain's tollgate.reservation_ttl says otherwise.
    #[arg(long, default_value_t = 300_000)]
    reservation_ttl_ms: u64,

    /// At most this many distinct descriptor `limit` overrides (each a plan in Redis);
    /// a request whose override would be one more is denied, logged and counted in
    /// tollgate_rls_override_plans_refused_total.
    #[arg(long, default_value_t = 1000)]
    max_override_plans: usize,

    /// A hit counts as near the limit past this share of it (near_limit metric).
    #[arg(long, env = "NEAR_LIMIT_RATIO", default_value_t = 0.8)]
    near_limit_ratio: f64,

    /// At most this many metric series with runtime values (detailed_metric,
    /// value_to_metric); past it, hits roll up under the rule's configured key.
    #[arg(long, default_value_t = 10_000)]
    max_detailed_series: usize,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Log filter (tracing's EnvFilter syntax: error, warn, info, debug, or
    /// per-module directives).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,

    /// On SIGTERM/SIGINT, stop accepting and wait at most this long for in-flight
    /// calls before exiting (health turns NOT_SERVING first).
    #[arg(long, default_value_t = 5000)]
    drain_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum HeaderKind {
    XRatelimit,
    Ietf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logs(args: &Args) {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Reloads the config: refused files keep the last good config.
async fn reload(service: &Service, metrics: &Metrics, args: &Args) -> bool {
    match config::load_dir(&args.config_dir, args.merge_domains, args.include_dot_files) {
        Err(e) => {
            metrics.config_load_error.inc();
            tracing::error!(error = %e, "config refused; keeping the last good config");
            true
        }
        Ok(new) => match service.sync_plans(&new).await {
            Ok(plans) => {
                metrics.config_load_success.inc();
                tracing::info!(files = ?new.files, plans, "config loaded");
                service.set_config(new);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot apply the plans of the new config yet; will retry");
                false
            }
        },
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logs(&args);
    let initial =
        match config::load_dir(&args.config_dir, args.merge_domains, args.include_dot_files) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tollgate-rls: {e}");
                return std::process::ExitCode::from(1);
            }
        };
    if args.check {
        for (plan, fields) in initial.plans() {
            let specs: Vec<String> = fields.iter().map(|(n, s)| format!("{n} \"{s}\"")).collect();
            println!("RL.PLAN.SET {plan} {}", specs.join(" "));
        }
        println!("config OK: {} file(s)", initial.files.len());
        return std::process::ExitCode::SUCCESS;
    }
    match run(args, initial).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "tollgate-rls stopped");
            eprintln!("tollgate-rls: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(args: Args, initial: config::Config) -> Result<(), Box<dyn std::error::Error>> {
    let timeout = Duration::from_millis(args.redis_timeout_ms.max(1));
    let redis = if args.cluster {
        let seeds: Vec<String> = args
            .redis_url
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        Redis::cluster(&seeds, timeout)?
    } else {
        Redis::single(&args.redis_url, usize::from(args.redis_pool_size), timeout)?
    };
    let metrics = Metrics::new(args.max_detailed_series);
    let settings = Settings {
        failure_mode: args.failure_mode,
        shadow_mode: args.shadow_mode,
        legacy_headers: args.response_headers.contains(&HeaderKind::XRatelimit),
        ietf_headers: args.response_headers.contains(&HeaderKind::Ietf),
        dynamic_metadata: args.dynamic_metadata,
        max_keys_per_call: usize::from(args.max_keys_per_call),
        reservation_ttl_ms: args.reservation_ttl_ms.max(1),
        max_override_plans: args.max_override_plans,
        near_limit_ratio: args.near_limit_ratio,
    };
    let service = Arc::new(Service::new(initial, redis, metrics.clone(), settings));
    let args = Arc::new(args);

    // Plans first (retrying while Redis is unreachable); the service answers by its
    // failure mode meanwhile, and health says NOT_SERVING.
    let ready = Arc::new(AtomicBool::new(false));
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<RateLimitServiceServer<Grpc>>()
        .await;
    {
        let service = service.clone();
        let ready = ready.clone();
        let health = health.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            loop {
                let config = service.config();
                match service.sync_plans(&config).await {
                    Ok(plans) => {
                        metrics.config_load_success.inc();
                        tracing::info!(files = ?config.files, plans, "plans applied; serving");
                        ready.store(true, Ordering::SeqCst);
                        health.set_serving::<RateLimitServiceServer<Grpc>>().await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot apply plans yet (is Redis up, with the tollgate module?); retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    // Reload on change (debounced; also retried while plans cannot be applied).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let dir = std::fs::canonicalize(&args.config_dir).unwrap_or_else(|_| args.config_dir.clone());
    let watched = args.config_dir.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // The parent is watched for a swap of the directory itself: ignore its other
        // entries (a busy /tmp would reload for nothing).
        let relevant = event.is_ok_and(|e| {
            e.paths.iter().any(|p| {
                p.starts_with(&dir) || p.starts_with(&watched) || p == &dir || p == &watched
            })
        });
        if relevant {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&args.config_dir, notify::RecursiveMode::NonRecursive)?;
    if let Some(parent) = args
        .config_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        // A symlink swap of the directory itself shows up in its parent.
        let _ = watcher.watch(parent, notify::RecursiveMode::NonRecursive);
    }
    {
        let service = service.clone();
        let metrics = metrics.clone();
        let args = args.clone();
        tokio::spawn(async move {
            let _watcher = watcher;
            while rx.recv().await.is_some() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                while rx.try_recv().is_ok() {}
                while !reload(&service, &metrics, &args).await {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    while rx.try_recv().is_ok() {}
                }
            }
        });
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http = {
        let ready = ready.clone();
        let healthy: Arc<dyn Fn() -> bool + Send + Sync> =
            Arc::new(move || ready.load(Ordering::SeqCst));
        let listener_addr = args.http_addr;
        let metrics = metrics.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(listener_addr, metrics, healthy, stop).await {
                tracing::error!(error = %e, addr = %listener_addr, "the HTTP server failed");
            }
        })
    };

    let listener = tokio::net::TcpListener::bind(args.grpc_addr).await?;
    tracing::info!(grpc = %listener.local_addr()?, http = %args.http_addr, cluster = args.cluster, "tollgate-rls listening");
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut stop_signal = stop_rx.clone();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(RateLimitServiceServer::new(Grpc(service.clone())))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop_signal.changed().await;
        });
    let mut server = tokio::spawn(server);

    tokio::select! {
        _ = wait_for_signal() => {}
        result = &mut server => {
            return Err(match result {
                Ok(Ok(())) => "the gRPC server stopped".into(),
                Ok(Err(e)) => Box::new(e),
                Err(e) => Box::new(e),
            });
        }
    }
    tracing::info!("shutting down: NOT_SERVING, draining in-flight calls");
    ready.store(false, Ordering::SeqCst);
    health
        .set_not_serving::<RateLimitServiceServer<Grpc>>()
        .await;
    let _ = stop_tx.send(true);
    match tokio::time::timeout(Duration::from_millis(args.drain_timeout_ms), server).await {
        Ok(_) => tracing::info!("drained; bye"),
        Err(_) => tracing::warn!("drain timeout passed; exiting with calls in flight"),
    }
    let _ = http.await;
    Ok(())
}
