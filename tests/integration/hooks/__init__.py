"""Fault hooks that integration tests install in worker processes.

A worker started with `LLMESH_TEST_HOOKS=tests.integration.hooks.<module>` imports the
module and runs its migrations with the module's `migration_faults`
(services/worker/migration/faults.py).
"""
