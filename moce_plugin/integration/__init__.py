"""The axolotl integration: plugin hooks, ``moce:`` input args, dataset and trainer hooks,
and the list of every patch of axolotl/transformers (:mod:`.patches`). Importing this
package does not import axolotl; its modules do."""
