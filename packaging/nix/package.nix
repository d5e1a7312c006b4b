# forkd built from this checkout: the daemon, the CLI, the benchmark, the
# zygote library where the daemon looks for it ($out/lib/forkd, found from
# $out/bin/forkd as ../lib/forkd), and the systemd/tmpfiles files with their
# paths pointing into $out.
{ lib
, rustPlatform
, makeWrapper
, coreutils
, gnused
}:

let
  workspace = lib.importTOML ../../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = "forkd";
  inherit (workspace.workspace.package) version;

  src = lib.fileset.toSource {
    root = ../..;
    fileset = lib.fileset.unions [
      ../../Cargo.toml
      ../../Cargo.lock
      ../../forkd
      ../../zygote
      ../../pool
      ../../cgroup
      ../../ipc
      ../../mcp
      ../../bench
      ../../compare
      ../../policy
      ../../packaging
    ];
  };
  cargoLock.lockFile = ../../Cargo.lock;

  cargoBuildFlags = [ "-p" "forkd" "-p" "forkd-zygote" "-p" "forkd-bench" ];
  # The test suite starts real daemons: it needs root, namespaces and cgroups,
  # none of which the Nix build sandbox has. Run scripts/test.sh as root.
  doCheck = false;

  nativeBuildInputs = [ makeWrapper ];

  postInstall = ''
    # cargoInstallHook puts the cdylib in $out/lib; forkd looks in ../lib/forkd.
    mkdir -p $out/lib/forkd
    mv $out/lib/libforkd_zygote.so $out/lib/forkd/
    find $out/lib -maxdepth 1 -type f -delete

    install -Dm0755 packaging/systemd/forkd-cgroup-leaf $out/lib/forkd/forkd-cgroup-leaf
    wrapProgram $out/lib/forkd/forkd-cgroup-leaf \
      --prefix PATH : ${lib.makeBinPath [ coreutils gnused ]}
    for unit in forkd.service forkd.socket; do
      install -Dm0644 packaging/systemd/$unit $out/lib/systemd/system/$unit
    done
    substituteInPlace $out/lib/systemd/system/forkd.service \
      --replace-fail /usr/lib/forkd/ $out/lib/forkd/ \
      --replace-fail /usr/bin/forkd $out/bin/forkd
    install -Dm0644 packaging/systemd/forkd.conf $out/lib/tmpfiles.d/forkd.conf
    install -Dm0644 packaging/forkd.toml $out/share/doc/forkd/forkd.toml
    install -Dm0644 packaging/README.md $out/share/doc/forkd/packaging.md
    install -Dm0644 policy/default.toml $out/share/forkd/policy/default.toml
  '';

  meta = {
    description = "Isolated Python sandboxes forked from warm zygotes";
    license = lib.licenses.asl20;
    platforms = lib.platforms.linux;
    mainProgram = "forkd-run";
  };
}
