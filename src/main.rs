fn main() {
    let path = std::env::args().nth(1).unwrap();
    match nixgold::fleet::load(std::path::Path::new(&path)) {
        Ok(f) => println!("{:#?}", f.fleet),
        Err(e) => {
            println!("{e}");
            if let nixgold::fleet::FleetError::Invalid { report, .. } = &e { println!("---\n{report}"); }
        }
    }
}
