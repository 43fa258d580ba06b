//! Generates the protocol's Rust types from `proto/` (protox parses the files, so no
//! `protoc` is needed; prost-build writes the code).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/io/statefun/sdk/request_reply.proto",
        "proto/io/statefun/sdk/egress.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new().bytes(["."]).compile_fds(descriptors)?;
    Ok(())
}
