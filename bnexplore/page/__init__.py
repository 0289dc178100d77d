"""The page: widgets, the view of a scenario and the chart builders (pure functions).
Nothing but the app and the tools import it.
"""
