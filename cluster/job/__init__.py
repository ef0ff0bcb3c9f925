"""What runs inside a sweep's Ray job: the driver (entry point), the executor (the plan on an actor
pool), the pool and its workers. Imports torch and Ray; the client side never imports it."""
