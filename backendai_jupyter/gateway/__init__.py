"""The gateway: REST API, scheduler, agent registry and the database behind them."""
