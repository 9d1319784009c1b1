"""Analysis of 2AFC votes: preference rates, tests, scaling, models, report.

Reads responses (contract 2) from files or a database; never imports the web app.
"""
