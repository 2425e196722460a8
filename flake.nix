{
  description = "nixgold: NixOS golden images and the VMs cloned from them on Proxmox VE, from one fleet file and a lockfile";

  # nixgold needs Rust >= 1.89 (edition 2024); nixos-25.11 has it.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      cargo = builtins.fromTOML (builtins.readFile ./Cargo.toml);
    in
    {
      packages = forAllSystems (pkgs: rec {
        nixgold = pkgs.rustPlatform.buildRustPackage {
          pname = "nixgold";
          inherit (cargo.package) version;
          src = self;
          cargoLock.lockFile = ./Cargo.lock;
          # Only the binary; the test suite starts loopback servers and
          # wants nix-instantiate and sshd (run it with `cargo test`).
          cargoBuildFlags = [ "--bin" "nixgold" ];
          doCheck = false;
          meta = {
            description = cargo.package.description;
            license = nixpkgs.lib.licenses.asl20;
            mainProgram = "nixgold";
            platforms = systems;
          };
        };
        default = nixgold;
      });

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = "${self.packages.${pkgs.stdenv.hostPlatform.system}.nixgold}/bin/nixgold";
        };
      });

      # services.nixgold: the drift timer and the quarterly cycle.
      nixosModules.default = import ./nix/module.nix self;
      nixosModules.nixgold = self.nixosModules.default;
    };
}
