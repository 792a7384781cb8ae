"""Task plugins shipped with the platform. Each registers under the `gppf.tasks` entry-point group
(pyproject.toml) and is imported the first time a job names its type, as a third-party plugin is."""
