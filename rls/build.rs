//! Generates the gRPC server and client of `envoy.service.ratelimit.v3` from the
//! vendored Envoy protos in `proto/` (see `proto/README.md`), with the pure-Rust
//! `protox` compiler: building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "envoy/service/ratelimit/v3/rls.proto";
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile([root], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
