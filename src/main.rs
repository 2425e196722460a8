fn main() -> std::process::ExitCode {
    nixgold::cli::run()
}
