"""The ``zsad`` command's work, below its torch-free parser ``zsad_cli``: each command (``commands``) imports what it
uses when it runs; ``predict`` turns image folders into files and records (no torch with an exported graph);
``runs`` records who owns an output folder (``--resume``); ``summaries`` prints what a command did."""
