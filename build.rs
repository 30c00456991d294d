//! Compiles the protobuf schemas in proto/ with a pure-Rust protobuf compiler
//! (protox), so building raftmq needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/state.proto", "proto/raft.proto", "proto/dynsec.proto", "proto/backup.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // `bytes` fields become `bytes::Bytes`, so payloads are shared, not copied.
    let config = || {
        let mut c = prost_build::Config::new();
        c.btree_map(["."]).bytes(["."]);
        c
    };
    // Each package is included by its own module (`crate::dynsec::pb`,
    // `crate::state::pb`, ...); packages that import dynsec.proto refer to it
    // there instead of generating it again.
    config().compile_fds(protox::compile(["proto/dynsec.proto"], ["proto"])?)?;
    let mut c = config();
    c.extern_path(".raftmq.dynsec", "crate::dynsec::pb");
    c.compile_fds(protox::compile(
        ["proto/state.proto", "proto/raft.proto", "proto/backup.proto"],
        ["proto"],
    )?)?;
    Ok(())
}
