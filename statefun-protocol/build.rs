//! Generates the protocol's Rust types from `proto/` (protox parses the files, so no
//! `protoc` is needed; prost-build writes the code). With the `grpc` feature,
//! tonic-prost-build also writes the `RemoteFunction` service's client and server,
//! which refer to the message types through `crate::reqreply`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let messages = [
        "proto/io/statefun/sdk/request_reply.proto",
        "proto/io/statefun/sdk/egress.proto",
    ];
    let service = "proto/io/statefun/sdk/remote_service.proto";
    for f in messages.iter().chain([&service]) {
        println!("cargo:rerun-if-changed={f}");
    }
    #[cfg(feature = "grpc")]
    {
        // First, so that the message pass below writes the message files last.
        let mut config = prost_build::Config::new();
        config.bytes(["."]);
        config.extern_path(".io.statefun.sdk.reqreply", "crate::reqreply");
        tonic_prost_build::configure()
            .build_transport(false)
            .compile_fds_with_config(protox::compile([service], ["proto"])?, config)?;
    }
    #[cfg(not(feature = "grpc"))]
    let _ = service;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(protox::compile(messages, ["proto"])?)?;
    Ok(())
}
