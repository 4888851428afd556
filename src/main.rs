fn main() {
    std::process::exit(snapctl::cli::main());
}
