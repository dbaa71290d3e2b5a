"""A deterministic vehicle simulator: the embedded default data set (no download needed).

Each episode is one vehicle on a straight multi-lane road, driven by a kinematic bicycle model
(wheelbase 2.7 m)::

    x' = v cos(yaw)    y' = v sin(yaw)    yaw' = v tan(steer) / L    v' = a

It performs one manoeuvre, which is the episode's label: ``keep`` (lane keeping with speed
wobble), ``lane_change_left`` / ``lane_change_right`` (a PD steering controller towards the lane
3.5 m away) or ``brake`` (a firm deceleration to a lower speed). A per-vehicle ``aggressiveness``
in [0.5, 1.5] scales accelerations and steering gains: a per-sequence regression target that the
IMU reveals. The output is the long table a driving team exports: one row per (sequence, time)
with noisy sensor channels

- ``x``, ``y``: position (GNSS, metres, noise 0.05 m),
- ``speed``: wheel odometry (m/s, noise 0.1),
- ``yaw_rate``: IMU gyroscope (rad/s, noise 0.01),
- ``accel_long``, ``accel_lat``: IMU accelerometer (m/s², noise 0.15),

plus ``manoeuvre`` and ``aggressiveness``. A small share of rows lose their IMU values (NaN, a
sensor dropout) so that the NaN rule of the data module has work to do.

Example:
    >>> table = simulate_vehicles(4, steps=30, seed=0)
    >>> sorted(table["manoeuvre"].unique()) == sorted(set(table["manoeuvre"]))
    True
    >>> table.shape[0]
    120
"""

from __future__ import annotations

import numpy as np
import pandas as pd

MANOEUVRES = ("keep", "lane_change_left", "lane_change_right", "brake")
WHEELBASE = 2.7
LANE_WIDTH = 3.5
SENSOR_CHANNELS = ("speed", "yaw_rate", "accel_long", "accel_lat")


def simulate_vehicles(count: int, steps: int = 40, dt: float = 0.25, seed: int = 0, dropout: float = 0.003) -> pd.DataFrame:
    """Simulate ``count`` vehicle episodes of ``steps`` samples every ``dt`` seconds.

    Args:
        count: number of episodes (one vehicle and one manoeuvre each).
        steps: samples per episode.
        dt: sampling period in seconds (the model integrates at ``dt / 5``).
        seed: the whole table depends only on ``(count, steps, dt, seed, dropout)``.
        dropout: probability that a row's IMU channels are missing (NaN).

    Returns:
        A long table sorted by ``sequence`` then ``time`` with the columns ``sequence, time, x, y,
        speed, yaw_rate, accel_long, accel_lat, manoeuvre, aggressiveness``.
    """
    if count < 1 or steps < 2 or dt <= 0:
        raise ValueError(f"simulator: need count >= 1, steps >= 2 and dt > 0; got count={count}, steps={steps}, dt={dt}")
    rng = np.random.default_rng(seed)
    label = rng.integers(0, len(MANOEUVRES), count)
    aggressive = rng.uniform(0.5, 1.5, count)
    v = rng.uniform(8.0, 22.0, count)
    lane = rng.integers(-1, 2, count) * LANE_WIDTH
    x, y, yaw = rng.uniform(0, 50, count), lane + rng.normal(0, 0.2, count), rng.normal(0, 0.01, count)
    start = rng.integers(2, max(3, steps // 4), count) * dt  # when the manoeuvre begins
    target_lane = lane + np.where(label == 1, LANE_WIDTH, np.where(label == 2, -LANE_WIDTH, 0.0))
    cruise = v.copy()
    brake_to = v * rng.uniform(0.3, 0.6, count)
    wobble = rng.uniform(0, 2 * np.pi, count)
    substeps = 5
    h = dt / substeps
    rows = np.zeros((count, steps, 6))  # x, y, speed, yaw_rate, accel_long, accel_lat
    accel = np.zeros(count)
    yaw_rate = np.zeros(count)
    for step in range(steps):
        rows[:, step] = np.stack([x, y, v, yaw_rate, accel, v * yaw_rate], 1)
        for sub in range(substeps):
            t = step * dt + sub * h
            active = t >= start
            lateral_target = np.where(active, target_lane, lane)
            gain = 0.04 * aggressive
            steer = np.clip(gain * (lateral_target - y) - (0.9 + 0.3 * aggressive) * yaw, -0.08, 0.08)
            speed_target = np.where((label == 3) & active, brake_to, cruise * (1 + 0.03 * np.sin(0.4 * t + wobble)))
            accel = np.clip(1.2 * aggressive * (speed_target - v), -4.5 * aggressive, 2.5 * aggressive)
            yaw_rate = v * np.tan(steer) / WHEELBASE
            x = x + h * v * np.cos(yaw)
            y = y + h * v * np.sin(yaw)
            yaw = yaw + h * yaw_rate
            v = np.maximum(v + h * accel, 0.0)
    noise = np.array([0.05, 0.05, 0.1, 0.01, 0.15, 0.15])
    rows = rows + rng.normal(0, 1, rows.shape) * noise
    missing = rng.uniform(size=(count, steps)) < dropout
    rows[..., 3:][missing] = np.nan
    names = np.array([f"veh{i:04d}" for i in range(count)])
    table = pd.DataFrame(
        {
            "sequence": np.repeat(names, steps),
            "time": np.tile(np.round(np.arange(steps) * dt, 6), count),
            **{name: rows[..., i].reshape(-1).astype(np.float32) for i, name in enumerate(("x", "y", *SENSOR_CHANNELS))},
            "manoeuvre": np.repeat(np.array(MANOEUVRES)[label], steps),
            "aggressiveness": np.repeat(aggressive.astype(np.float32), steps),
        }
    )
    return table
