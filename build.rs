//! Compiles the protobuf schemas in proto/ with a pure-Rust protobuf compiler
//! (protox), so building raftmq needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/state.proto", "proto/raft.proto", "proto/dynsec.proto", "proto/backup.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    // `bytes` fields become `bytes::Bytes`, so payloads are shared, not copied.
    prost_build::Config::new().btree_map(["."]).bytes(["."]).compile_fds(fds)?;
    Ok(())
}
