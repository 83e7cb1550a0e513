fn main() { println!("nvcopy placeholder"); }
