{
  description = "forkd: isolated Python sandboxes forked from warm zygotes";

  # Pinned by flake.lock once created (`nix flake lock`; needs GitHub access).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (system: pkgs: {
        forkd = pkgs.callPackage ./packaging/nix/package.nix { };
        default = self.packages.${system}.forkd;
        # A zygote interpreter with numpy (the default zygote preloads it).
        python = pkgs.python3.withPackages (ps: [ ps.numpy ]);
      });

      apps = forAllSystems (system: pkgs:
        let forkd = self.packages.${system}.forkd; in {
          forkd = { type = "app"; program = "${forkd}/bin/forkd"; };
          forkd-run = { type = "app"; program = "${forkd}/bin/forkd-run"; };
          forkd-bench = { type = "app"; program = "${forkd}/bin/forkd-bench"; };
          default = self.apps.${system}.forkd-run;
        });

      devShells = forAllSystems (system: pkgs: {
        default = pkgs.mkShell {
          packages = [
            pkgs.cargo
            pkgs.rustc
            pkgs.clippy
            pkgs.rustfmt
            (pkgs.python3.withPackages (ps: [ ps.numpy ]))
            pkgs.kubeconform
          ];
          # scripts/test.sh and the tests use this interpreter.
          shellHook = ''
            export FORKD_TEST_PYTHON=$(command -v python3)
          '';
        };
      });

      overlays.default = final: _prev: {
        forkd = final.callPackage ./packaging/nix/package.nix { };
      };

      nixosModules.forkd = import ./packaging/nix/module.nix self;
      nixosModules.default = self.nixosModules.forkd;
    };
}
