"""The command-line layer, on top of everything: argparse types (``types``), the shared parser (``parser``), flag
groups (``groups``), recipes and the seed's flags (``recipes``), flags to settings (``configs``), running a script
(``run``: exit codes, errors, flag names in messages), what scripts print (``output``), the module commands
(``commands``). The only place that imports argparse or reads parsed arguments."""
