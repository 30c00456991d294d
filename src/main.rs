fn main() {
    println!("raftmq {}", env!("CARGO_PKG_VERSION"));
}
