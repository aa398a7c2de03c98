fn main() {
    eprintln!("airlock-kiosk: not built yet");
    std::process::exit(1);
}
