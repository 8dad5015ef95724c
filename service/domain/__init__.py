"""The domain: states, rules and parsing. Imports nothing of aiohttp or the database."""
