"""Loss plugins (`loss=ce|chunked_ce|liger`): how a micro-batch's token-sum loss comes out of the model."""
