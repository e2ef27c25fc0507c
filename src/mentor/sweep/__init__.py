"""Sweeps: recipes × an override grid × seeds, one run directory per cell, run on the machines at hand.

A sweep is the cross product of recipes, the values of an override grid and seeds. Each cell is one
``mentor train`` run in a directory of its own under the sweep's root, named from what makes it differ
(``<recipe stem>/<key=value,...>/seed<k>``), and ``sweep.json`` at the root lists every cell with its
recipe, overrides, seed, directory and status. A sweep file::

    out: runs/sweeps/kd_temperature
    recipes: [recipes/distill/fmnist_kd.yaml, recipes/distill/fmnist_dkd.yaml]
    overrides: [trainer.max_steps=300]          # applied to every cell
    grid: {method.temperature: [2, 4, 8]}       # cross product
    seeds: [0, 1, 2]                            # trainer.seed of each cell
    launcher: {name: local, processes: 2}       # local | slurm

Every cell's recipe is validated before anything starts. Re-running a sweep skips the finished cells
(their ``summary.json`` covers the recipe's steps), resumes the interrupted ones from ``last.pt`` (the
engine does, given the same ``out_dir``) and runs the failed ones again; one failing cell never stops
the others. Launchers: :class:`LocalLauncher` (worker processes on this machine, one per GPU or sharing
the CPU cores) and :class:`SlurmLauncher` (a Slurm job array through ``submitit``, ``mentor[sweep]``).
Python code builds :class:`Cell` objects itself and calls :func:`run_cells`.
"""

from .cells import INDEX, LOG, Cell, CellResult, cell_state, make_cells, point_name, prepare, value_text
from .files import Sweep, execute, load_sweep, parse_grid_args, parse_seeds, split_values, train_sweep
from .launch import LocalLauncher, SlurmLauncher, available_cores, make_launcher, train_argv, visible_gpus
from .run import run_cells, table

__all__ = ["INDEX", "LOG", "Cell", "CellResult", "LocalLauncher", "SlurmLauncher", "Sweep", "available_cores",
           "cell_state", "execute", "load_sweep", "make_cells", "make_launcher", "parse_grid_args", "parse_seeds",
           "point_name", "prepare", "run_cells", "split_values", "table", "train_argv", "train_sweep", "value_text",
           "visible_gpus"]
