"""Analysis of 2AFC votes: preference rates, tests, scaling, models, report.

Reads responses (contract 2) from files or a database; never imports the web app at
import time. Tidy DataFrame in, tidy DataFrame or a small results object out.
"""

from analysis.pairs import preference_table

__all__ = ["preference_table"]
