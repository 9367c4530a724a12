"""The reliability fault suite: each test injects one fault into real processes, sockets, files or
servers and asserts the guarantee that docs/guarantees.md writes down, not merely that nothing
crashed."""
