"""The domain: records, operations, the status machine, codes, ids and images.

Nothing here imports from the rest of the project.
"""
