//! loadgen: simulated Teltonika fleets (stub; grows with the ingest issue).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    eprintln!("loadgen: not implemented yet");
    std::process::exit(2);
}
