"""A deterministic generator of card transactions with injected fraud: the finance default data.

Structure: customers with a home country, an age, a spending level and favourite merchant
categories; merchants with a category and a country; amounts log-normal per category and customer;
times following a daily profile (quiet at night) over 8 weeks; velocity features (seconds since the
customer's previous transaction, transactions in the last hour) and the distance from home.

Fraud patterns (each a share of the frauds):

- **card testing** (40 %): bursts of tiny online amounts at digital/electronics merchants, seconds
  apart, many transactions in the last hour.
- **unusual merchant and amount** (35 %): a large amount at jewellery/electronics/travel
  merchants, often abroad and far from home, card not present.
- **odd hours** (25 %): ATM cash withdrawals between 01:00 and 05:00, far from home, large amounts.

Columns: ``transaction_id``, ``customer_id`` (ids), ``timestamp``, ``amount``,
``merchant_category``, ``channel``, ``country``, ``card_present``, ``distance_from_home_km``,
``seconds_since_previous``, ``transactions_last_hour``, ``customer_age``, ``is_fraud`` (0/1).

Example:
    >>> frame = make_card_transactions(200, fraud_rate=0.05, seed=0)
    >>> frame.shape, int(frame["is_fraud"].sum())
    ((200, 13), 10)
    >>> frame.equals(make_card_transactions(200, fraud_rate=0.05, seed=0))
    True
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CATEGORIES = ("grocery", "fuel", "restaurant", "online_retail", "travel", "electronics", "pharmacy", "entertainment", "jewelry", "digital_goods", "atm")
#: typical log-amount (mean, sd) per category
_AMOUNT = {
    "grocery": (3.5, 0.6), "fuel": (3.7, 0.4), "restaurant": (3.3, 0.6), "online_retail": (3.9, 0.8), "travel": (5.5, 0.8),
    "electronics": (5.0, 0.9), "pharmacy": (3.0, 0.6), "entertainment": (3.2, 0.7), "jewelry": (5.2, 0.8), "digital_goods": (2.5, 0.8),
    "atm": (4.3, 0.6),
}  # fmt: skip
_CATEGORY_WEIGHTS = np.array([0.25, 0.12, 0.16, 0.14, 0.03, 0.04, 0.07, 0.07, 0.01, 0.05, 0.06])
_CHANNEL = {"online_retail": "online", "digital_goods": "online", "travel": "online", "atm": "atm"}
COUNTRIES = ("US", "CA", "GB", "DE", "FR", "MX", "BR", "NG", "RU", "CN")
_HOUR_PROFILE = np.array([0.3, 0.15, 0.1, 0.08, 0.08, 0.15, 0.5, 1.2, 2.0, 2.2, 2.3, 2.6, 3.0, 2.8, 2.5, 2.4, 2.6, 3.0, 3.2, 3.0, 2.4, 1.8, 1.1, 0.6])
START = pd.Timestamp("2024-03-04")


def _times(rng: np.random.Generator, n: int, days: int, hours: np.ndarray | None = None) -> pd.DatetimeIndex:
    if hours is None:
        hours = rng.choice(24, size=n, p=_HOUR_PROFILE / _HOUR_PROFILE.sum())
    seconds = rng.integers(0, days, n) * 86400 + hours * 3600 + rng.integers(0, 3600, n)
    return START + pd.to_timedelta(seconds, unit="s")


def make_card_transactions(rows: int = 20000, fraud_rate: float = 0.02, seed: int = 0, customers: int | None = None) -> pd.DataFrame:
    """Generate ``rows`` transactions, ``round(rows * fraud_rate)`` of them fraudulent, in time order.

    Args:
        rows: number of transactions.
        fraud_rate: share of fraudulent transactions.
        seed: the same seed gives the same table.
        customers: number of customers (default: ``rows // 25``, at least 10).
    """
    if rows < 10:
        raise ValueError(f"synthetic data needs at least 10 rows, got {rows}")
    if not 0 <= fraud_rate < 0.5:
        raise ValueError(f"fraud_rate must be in [0, 0.5), got {fraud_rate}")
    rng = np.random.default_rng(seed)
    n_customers = customers or max(10, rows // 25)
    days = 56
    home = rng.choice(len(COUNTRIES), n_customers, p=[0.55, 0.12, 0.1, 0.06, 0.05, 0.05, 0.03, 0.02, 0.01, 0.01])
    age = np.clip(rng.normal(44, 15, n_customers), 18, 90).round()
    spend = rng.normal(0.0, 0.35, n_customers)
    favourites = np.stack([rng.dirichlet(_CATEGORY_WEIGHTS * 30) for _ in range(n_customers)])
    rate_per_day = rng.gamma(2.0, 1.2, n_customers) + 0.3

    n_fraud = int(round(rows * fraud_rate))
    n_normal = rows - n_fraud

    # ----- normal behaviour --------------------------------------------------------------
    who = rng.integers(0, n_customers, n_normal)
    category = np.array([rng.choice(len(CATEGORIES), p=favourites[c]) for c in who])
    cat_names = np.array(CATEGORIES)[category]
    mean_sd = np.array([_AMOUNT[c] for c in cat_names])
    amount = np.exp(rng.normal(mean_sd[:, 0] + spend[who], mean_sd[:, 1]))
    abroad = rng.random(n_normal) < 0.03
    country = np.where(abroad, rng.integers(0, len(COUNTRIES), n_normal), home[who])
    distance = np.where(abroad, rng.gamma(3.0, 800.0, n_normal), rng.gamma(1.5, 6.0, n_normal))
    channel = np.array([_CHANNEL.get(c, "pos") for c in cat_names], dtype=object)
    card_present = (channel != "online") & (rng.random(n_normal) > 0.02)
    gap = rng.exponential(86400.0 / rate_per_day[who])
    last_hour = rng.poisson(np.maximum(rate_per_day[who] / 24.0 * 2.0, 0.01))
    normal = pd.DataFrame({
        "customer": who, "timestamp": _times(rng, n_normal, days), "amount": amount, "merchant_category": cat_names,
        "channel": channel, "country": np.array(COUNTRIES)[country], "card_present": card_present,
        "distance_from_home_km": distance, "seconds_since_previous": gap, "transactions_last_hour": last_hour, "is_fraud": 0,
    })  # fmt: skip

    # ----- fraud patterns ------------------------------------------------------------------
    kinds = rng.choice(3, n_fraud, p=[0.4, 0.35, 0.25])
    victim = rng.integers(0, n_customers, n_fraud)
    f_cat = np.where(
        kinds == 0, rng.choice(["digital_goods", "electronics", "online_retail"], n_fraud, p=[0.6, 0.2, 0.2]),
        np.where(kinds == 1, rng.choice(["jewelry", "electronics", "travel"], n_fraud), "atm"),
    )  # fmt: skip
    f_amount = np.where(
        kinds == 0, rng.uniform(0.5, 3.0, n_fraud).round(2),
        np.where(kinds == 1, np.exp(rng.normal(7.3, 0.6, n_fraud)), np.exp(rng.normal(6.0, 0.4, n_fraud))),
    )  # fmt: skip
    f_abroad = np.where(kinds == 0, rng.random(n_fraud) < 0.3, rng.random(n_fraud) < 0.7)
    foreign = rng.choice([5, 6, 7, 8, 9], n_fraud)
    f_country = np.where(f_abroad, foreign, home[victim])
    f_distance = np.where(f_abroad, rng.gamma(4.0, 1500.0, n_fraud), rng.gamma(2.0, 60.0, n_fraud))
    f_channel = np.where(kinds == 2, "atm", "online").astype(object)
    f_hours = np.where(kinds == 2, rng.integers(1, 5, n_fraud), rng.choice(24, n_fraud, p=_HOUR_PROFILE / _HOUR_PROFILE.sum()))
    f_gap = np.where(kinds == 0, rng.uniform(2, 90, n_fraud), rng.exponential(3600.0 * 6, n_fraud))
    f_last_hour = np.where(kinds == 0, rng.integers(6, 30, n_fraud), rng.poisson(0.5, n_fraud))
    fraud = pd.DataFrame({
        "customer": victim, "timestamp": _times(rng, n_fraud, days, f_hours), "amount": f_amount, "merchant_category": f_cat,
        "channel": f_channel, "country": np.array(COUNTRIES)[f_country], "card_present": (kinds == 2) & (rng.random(n_fraud) < 0.5),
        "distance_from_home_km": f_distance, "seconds_since_previous": f_gap, "transactions_last_hour": f_last_hour, "is_fraud": 1,
    })  # fmt: skip

    frame = pd.concat([normal, fraud], ignore_index=True).sort_values("timestamp", kind="stable").reset_index(drop=True)
    frame.insert(0, "transaction_id", [f"T{seed:03d}{i:08d}" for i in range(len(frame))])
    frame.insert(1, "customer_id", [f"C{c:06d}" for c in frame.pop("customer")])
    frame["customer_age"] = age[[int(c[1:]) for c in frame["customer_id"]]]
    frame["amount"] = frame["amount"].round(2)
    frame["distance_from_home_km"] = frame["distance_from_home_km"].round(1)
    frame["seconds_since_previous"] = frame["seconds_since_previous"].round(0)
    frame["timestamp"] = frame["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S")
    order = ["transaction_id", "customer_id", "timestamp", "amount", "merchant_category", "channel", "country", "card_present",
             "distance_from_home_km", "seconds_since_previous", "transactions_last_hour", "customer_age", "is_fraud"]  # fmt: skip
    return frame[order]
