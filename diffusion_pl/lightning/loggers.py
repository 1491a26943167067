"""CSVLogger that keeps an earlier run's metrics.csv and appends to it.

Lightning's CSVLogger deletes ``metrics.csv`` when it starts in a folder that has one (a resumed run with a fixed
``version``, or a refused run pointed at an earlier run's folder), so the earlier rows were lost. Here the file is
moved aside while Lightning's writer starts, then put back, and the writer continues it: the same header, new rows
appended (a new metric name rewrites the file with the wider header, keeping every row, as Lightning does).
``diffusion-pl fit`` uses this class wherever a config names ``lightning.pytorch.loggers.CSVLogger``.
"""

from __future__ import annotations

import csv
import os
import warnings

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

LIGHTNING_CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
APPENDING_CSV_LOGGER = "diffusion_pl.lightning.loggers.AppendingCSVLogger"


class AppendingExperimentWriter(ExperimentWriter):
    """ExperimentWriter that continues an existing ``metrics.csv`` instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        aside = os.path.join(log_dir, f".{self.NAME_METRICS_FILE}.kept")
        if os.path.isfile(aside) and not os.path.isfile(path):
            os.replace(aside, path)  # a start interrupted between the two renames below
        kept = os.path.isfile(path)
        if kept:
            os.replace(path, aside)
        try:
            with warnings.catch_warnings():
                # "Previous log files in this directory will be deleted": not true here.
                warnings.filterwarnings("ignore", message=r".*Previous log files in this directory will be deleted")
                super().__init__(log_dir)
        finally:
            if kept:
                os.replace(aside, path)
        if kept:
            with open(path, newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger (same arguments and folders) whose metrics.csv is appended to, never deleted."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.appending_writer: ExperimentWriter | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if not isinstance(get_filesystem(self.root_dir), LocalFileSystem):
            return super().experiment  # remote storage: Lightning's writer
        if self.appending_writer is None:
            get_filesystem(self.root_dir).makedirs(self.root_dir, exist_ok=True)
            self.appending_writer = AppendingExperimentWriter(log_dir=self.log_dir)
        return self.appending_writer

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Flush the appending writer (Lightning's finalize only flushes the writer it created itself)."""
        if self.appending_writer is not None:
            self.save()
        else:
            super().finalize(status)


def use_appending_csv_logger(logger_config: object) -> None:
    """In a parsed ``trainer.logger`` config (one logger or a list), name AppendingCSVLogger wherever Lightning's
    CSVLogger is named (same arguments)."""
    for item in logger_config if isinstance(logger_config, list) else [logger_config]:
        if getattr(item, "class_path", None) == LIGHTNING_CSV_LOGGER:
            item.class_path = APPENDING_CSV_LOGGER
