# services.nixgold: Day 2 of a nixgold fleet on a NixOS host — a drift timer
# (with a textfile for node_exporter) and the quarterly cycle (`nixgold
# cycle`: update, plan --out, apply of that plan only when `cycle.apply` is
# set). The same units `nixgold schedule --systemd` writes for other hosts.
#
# Secrets stay out of the Nix store: each is a file named in `credentials`,
# handed to the units as a systemd credential (LoadCredential=), and nixgold
# reads it through NAME_FILE=%d/NAME.
self:
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.nixgold;
  inherit (lib) mkEnableOption mkIf mkOption types;

  textfile =
    name: lib.optionalString (cfg.textfileDir != null) " --prometheus ${cfg.textfileDir}/${name}";

  service = description: command: {
    inherit description;
    wants = [ "network-online.target" ];
    after = [ "network-online.target" ];
    environment = lib.mapAttrs' (name: _: lib.nameValuePair "${name}_FILE" "%d/${name}") cfg.credentials;
    serviceConfig = {
      Type = "oneshot";
      WorkingDirectory = cfg.workingDirectory;
      LoadCredential = lib.mapAttrsToList (name: path: "${name}:${path}") cfg.credentials;
      ExecStart = "${lib.getExe cfg.package} ${command}";
      # 2 is "drift" / "a plan waits": a result, not a failure.
      SuccessExitStatus = "2";
      StateDirectory = "nixgold";
      NoNewPrivileges = true;
      PrivateTmp = true;
    };
  };

  timer = calendar: {
    wantedBy = [ "timers.target" ];
    timerConfig = {
      OnCalendar = calendar;
      Persistent = true;
      RandomizedDelaySec = "5m";
    };
  };
in
{
  options.services.nixgold = {
    enable = mkEnableOption "nixgold's drift timer and quarterly cycle";

    package = mkOption {
      type = types.package;
      default = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      defaultText = lib.literalExpression "nixgold.packages.\${system}.default";
      description = "The nixgold package.";
    };

    fleet = mkOption {
      type = types.str;
      example = "/srv/fleet/fleet.ncl";
      description = "The fleet file: a path outside the Nix store, since `update` writes the lockfile beside it.";
    };

    workingDirectory = mkOption {
      type = types.str;
      default = dirOf cfg.fleet;
      defaultText = lib.literalExpression "dirOf config.services.nixgold.fleet";
      description = "Where the units run (relative paths in the fleet start here).";
    };

    credentials = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        PROXMOX_VE_API_TOKEN = "/etc/nixgold/credentials/PROXMOX_VE_API_TOKEN";
      };
      description = "Secrets by the environment variable the fleet reads them from, each a file outside the Nix store (a systemd credential; nixgold reads NAME_FILE).";
    };

    textfileDir = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/var/lib/prometheus-node-exporter-text-files";
      description = "node_exporter's textfile directory: nixgold-drift.prom and nixgold-cycle.prom go there.";
    };

    drift = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Check for drift on a timer.";
      };
      interval = mkOption {
        type = types.str;
        default = "hourly";
        description = "When to check (systemd.time(7) calendar event).";
      };
    };

    cycle = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Run the quarterly cycle: update, plan --out, and apply if `apply` is set.";
      };
      calendar = mkOption {
        type = types.str;
        default = "quarterly";
        description = "When to run it (systemd.time(7) calendar event).";
      };
      apply = mkOption {
        type = types.bool;
        default = false;
        description = "Apply the plan. Without it the cycle only reports (exit 2) and keeps the plan in `planFile`.";
      };
      planFile = mkOption {
        type = types.str;
        default = "/var/lib/nixgold/cycle.plan";
        description = "Where the cycle keeps its plan.";
      };
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = lib.all (path: !(lib.hasPrefix builtins.storeDir path)) (lib.attrValues cfg.credentials);
        message = "services.nixgold.credentials must name files outside the Nix store (it is world-readable).";
      }
    ];

    systemd.services.nixgold-drift = mkIf cfg.drift.enable (
      service "Compare the cluster with the fleet (nixgold drift)"
        "drift ${cfg.fleet} --locked${textfile "nixgold-drift.prom"}"
    );
    systemd.timers.nixgold-drift = mkIf cfg.drift.enable (timer cfg.drift.interval);

    systemd.services.nixgold-cycle = mkIf cfg.cycle.enable (
      service "The quarterly cycle: update, plan, apply if opted in (nixgold cycle)"
        "cycle ${cfg.fleet} --plan-out ${cfg.cycle.planFile}${lib.optionalString cfg.cycle.apply " --apply"}${textfile "nixgold-cycle.prom"}"
    );
    systemd.timers.nixgold-cycle = mkIf cfg.cycle.enable (timer cfg.cycle.calendar);
  };
}
