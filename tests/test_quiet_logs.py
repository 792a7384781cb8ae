"""The worker silences Ray Train's per-report INFO line (the whole metrics dict, every rank)."""

from __future__ import annotations

import logging

from ray.train.v2._internal.execution import context

from gppf.train_loop import _quiet_ray_train_reports


def test_ray_train_report_log_is_silenced(caplog):
    caplog.set_level(logging.INFO)  # the root level in a Ray worker
    logging.getLogger(context.__file__).setLevel(logging.NOTSET)
    assert context.logger.isEnabledFor(logging.INFO)  # the line would be printed
    _quiet_ray_train_reports()
    assert not context.logger.isEnabledFor(logging.INFO)
    assert context.logger.isEnabledFor(logging.WARNING)
