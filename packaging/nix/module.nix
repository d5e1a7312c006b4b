# NixOS module: services.forkd. Uses the package's own forkd.service and
# forkd.socket (the same hardening as on other distributions) and adds the
# configuration file, the zygote interpreter and a policy for /nix/store.
#
#   services.forkd = {
#     enable = true;
#     socketGroup = "forkd";              # members may connect ...
#     settings.allowed_gids = [ 990 ];    # ... if forkd's allow-list says so
#     settings.zygote = [ { name = "default"; python = "${py}/bin/python3"; preload = [ "numpy" "pandas" ]; } ];
#   };
flake:
{ config, lib, pkgs, ... }:

let
  cfg = config.services.forkd;
  toml = pkgs.formats.toml { };

  # forkd binds only /usr, /lib*, /bin, /sbin and the interpreter's own
  # prefixes into a sandbox. On NixOS the interpreter's libraries (glibc,
  # openblas, ...) are other /nix/store paths, so the store is bound
  # read-only too. It is world-readable on NixOS anyway; keep secrets out of it.
  defaultPolicy = lib.recursiveUpdate (lib.importTOML ../../policy/default.toml) {
    filesystem.read_only = (lib.importTOML ../../policy/default.toml).filesystem.read_only
      ++ [ "/nix/store" "/run/current-system/sw" ];
  };

  configFile = toml.generate "forkd.toml" cfg.settings;
in
{
  options.services.forkd = {
    enable = lib.mkEnableOption "forkd, isolated Python sandboxes forked from warm zygotes";

    package = lib.mkOption {
      type = lib.types.package;
      default = flake.packages.${pkgs.stdenv.hostPlatform.system}.forkd;
      defaultText = lib.literalExpression "forkd.packages.\${system}.forkd";
      description = "The forkd package.";
    };

    python = lib.mkOption {
      type = lib.types.package;
      default = pkgs.python3.withPackages (ps: [ ps.numpy ]);
      defaultText = lib.literalExpression "pkgs.python3.withPackages (ps: [ ps.numpy ])";
      description = "Interpreter of the default zygote (it must provide the preload modules).";
    };

    socketGroup = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "forkd";
      description = ''
        Group of /run/forkd/forkd.sock (mode 0660); created if set. Its
        members can reach the socket; forkd then also requires their uid
        or primary gid in `settings.allowed_uids` / `settings.allowed_gids`.
      '';
    };

    settings = lib.mkOption {
      type = toml.type;
      default = { };
      description = ''
        forkd's configuration (forkd.toml), as in the README's
        "Configuration". The module sets the socket, a `default` zygote
        running `python` with numpy preloaded, the cgroup v2 subtree systemd
        delegates to forkd.service, and a default policy that binds /nix/store.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    services.forkd.settings = {
      socket = lib.mkDefault "/run/forkd/forkd.sock";
      zygote = lib.mkDefault [{
        name = "default";
        python = "${cfg.python}/bin/python3";
        preload = [ "numpy" ];
      }];
      # NixOS runs cgroup v2; forkd-cgroup-leaf moves the daemon into
      # forkd.service/daemon so that this subtree can hold the sandboxes.
      cgroup.v2_root = lib.mkDefault "/sys/fs/cgroup/system.slice/forkd.service";
      policies.default = lib.mkDefault "${toml.generate "forkd-default-policy.toml" defaultPolicy}";
    };

    environment.etc."forkd/forkd.toml".source = configFile;
    environment.systemPackages = [ cfg.package ];

    systemd.packages = [ cfg.package ];
    systemd.tmpfiles.packages = [ cfg.package ];
    systemd.sockets.forkd = {
      wantedBy = [ "sockets.target" ];
      socketConfig = lib.mkIf (cfg.socketGroup != null) { SocketGroup = cfg.socketGroup; };
    };
    systemd.services.forkd = {
      restartTriggers = [ configFile ];
    };

    users.groups = lib.mkIf (cfg.socketGroup != null) { ${cfg.socketGroup} = { }; };
  };
}
