//! Runs the software NVMe/TCP target until killed, for trying nvcopy by hand:
//! `cargo run -p nvcopy-tcp-sim --example serve` prints the region to copy to.

fn main() -> Result<(), nvcopy_tcp_sim::StartError> {
    let sim = nvcopy_tcp_sim::TcpSim::start(nvcopy_tcp_sim::SimConfig::default())?;
    println!("{}", sim.url(1));
    loop {
        std::thread::sleep(std::time::Duration::from_secs(5));
        eprintln!("{:?}", sim.counters());
    }
}
