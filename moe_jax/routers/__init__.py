"""Built-in routers; importing this package registers them."""
